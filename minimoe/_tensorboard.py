"""TensorBoard output shared by `RoutingMonitor.to_tensorboard` and the Trainer. TensorBoard is an
optional extra: it is imported only when a writer is made here, never when this module loads."""

import os


def summary_writer(writer):
    """A `torch.utils.tensorboard.SummaryWriter` as given, or one made for a log directory
    (a str or os.PathLike) -> (the writer, whether it was made here)."""
    if not isinstance(writer, str | os.PathLike):
        return writer, False
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError("TensorBoard logging needs the tensorboard package: "
                          "pip install minimoe[tensorboard] (or pip install 'tensorboard>=2.14')") from err
    return SummaryWriter(os.fspath(writer)), True


def add_load_share(writer, tag: str, share, step: int) -> None:
    """share [E] (fractions of the assignments) as a histogram over the expert ids: bucket e,
    (e - 0.5, e + 0.5], holds expert e's share, so TensorBoard draws the load per expert."""
    share = [float(s) for s in share]
    used = [e for e, s in enumerate(share) if s > 0]
    writer.add_histogram_raw(tag, min=used[0], max=used[-1], num=sum(share),
                             sum=sum(e * s for e, s in enumerate(share)),
                             sum_squares=sum(e * e * s for e, s in enumerate(share)),
                             bucket_limits=[e + 0.5 for e in range(len(share))], bucket_counts=share,
                             global_step=step)
