"""The `minimoe` command line.

  minimoe doctor                 the environment the course will run in
  minimoe grade STUDENT.ipynb    grade exercise notebooks against solutions/ (see minimoe.grade)
  minimoe train [OPTIONS]        train the chapter-07 model; `minimoe train --help` lists the
                                 options (under torchrun: `torchrun ... -m minimoe train ...`)
"""

import argparse
import importlib
import platform
import sys

from minimoe import grade


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # noqa: BLE001  (a broken install must not crash the doctor)
        return None


def _kernel_mode() -> str:
    """How chapter 11's Triton kernels run on this machine (importing them sets up Triton)."""
    try:
        from minimoe import kernels
    except Exception as error:  # noqa: BLE001  (a broken Triton must not crash the doctor)
        return f"cannot load minimoe.kernels: {error}"
    return {"compiled": "Triton kernels compiled for the GPU",
            "interpreted": "Triton kernels interpreted on CPU (TRITON_INTERPRET=1, slow)",
            "torch": "torch fallback (Triton cannot run here)"}[kernels.MODE]


def doctor() -> int:
    """Print versions and accelerators, and what the course will skip on this machine."""
    versions = {"python": platform.python_version()}
    for module in ("minimoe", "numpy", "torch", "matplotlib", "seaborn", "triton", "nbval", "jupyterlab"):
        versions[module] = _version(module)
    for name, version in versions.items():
        print(f"{name:<11} {version or 'not installed'}")

    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(gpus))
    print(f"{'cuda':<11} {f'{gpus} GPU(s): {names}' if gpus else 'no GPU'}")
    print(f"{'cpu threads':<11} {torch.get_num_threads()}")
    print(f"{'kernels':<11} {_kernel_mode()}")

    skipped = []
    if not gpus:
        skipped.append("ch 10, 12: NCCL expert parallelism (gloo on CPU processes runs instead)")
        skipped.append("ch 11: Triton kernel timings on a GPU (the Triton interpreter runs on CPU instead)")
    elif gpus < 2:
        skipped.append("ch 10, 12: multi-GPU NCCL runs need 2 GPUs (gloo on CPU processes runs instead)")
    if versions["triton"] is None:
        skipped.append("ch 11: the Triton kernel (pip install 'minimoe[triton]' on Linux); the torch fallback runs")
    if versions["jupyterlab"] is None:
        skipped.append("the notebooks need JupyterLab: pip install 'minimoe[course]'")
    print("\nthe course will skip:" if skipped else "\nnothing is skipped: every chapter runs in full")
    for line in skipped:
        print(f"  - {line}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # every option after it is train_cli's
        from minimoe import train_cli  # imports torch.distributed: only when asked

        train_cli.main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="minimoe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("doctor", help="versions, accelerators and what the course will skip")
    grade.add_arguments(commands.add_parser("grade", help="grade exercise notebooks", description=grade.__doc__))
    commands.add_parser("train", help="train the chapter-07 model (`minimoe train --help` for its options)")
    args = parser.parse_args(argv)
    return doctor() if args.command == "doctor" else grade.run(args)


if __name__ == "__main__":
    sys.exit(main())
