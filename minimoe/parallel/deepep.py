"""DeepEP's published all-to-all measurements per expert-parallel size, to hold the cost model
against (chapter 10).

Source: github.com/deepseek-ai/DeepEP, docs/legacy.md at commit dd758caf4518 (2026-07-14), the
"Performance" section of DeepEP V1 (it was the README before V2). Hardware: H800 GPUs (NVLink
~160 GB/s), one ConnectX-7 InfiniBand 400 Gb/s card per GPU (~50 GB/s), 8 GPUs per node.
Hidden size 7168, top-8 experts, FP8 dispatch (7168 bytes + 56 float32 scales per token copy),
BF16 combine.

- `NORMAL`: the high-throughput kernels (NVLink and RDMA forwarding, a token sent once per node),
  4096 tokens per GPU, top-4 node groups; "bottleneck bandwidth" in GB/s, NVLink for EP 8, RDMA
  above. Rows: EP size -> (dispatch GB/s, combine GB/s).
- `LOW_LATENCY`: the low-latency kernels (pure RDMA), 128 tokens per GPU, per expert copy.
  Rows: EP size -> (dispatch us, combine us, dispatch RDMA GB/s, combine RDMA GB/s).
"""

SOURCE = "deepseek-ai/DeepEP docs/legacy.md @ dd758caf4518, Performance (DeepEP V1)"
HIDDEN, TOP_K, GPUS_PER_NODE = 7168, 8, 8
NVLINK_BANDWIDTH, RDMA_BANDWIDTH = 160e9, 50e9  # bytes/s, as the table's notes state them
FP8_COPY_BYTES = HIDDEN + HIDDEN // 128 * 4  # e4m3 values + one float32 scale per 128 channels
BF16_COPY_BYTES = 2 * HIDDEN

NORMAL_TOKENS = 4096
NORMAL = {8: (153, 158), 16: (43, 43), 32: (58, 57), 64: (51, 50)}

LOW_LATENCY_TOKENS = 128
LOW_LATENCY = {
    8: (77, 114, 98, 127),
    16: (118, 195, 63, 74),
    32: (155, 273, 48, 53),
    64: (173, 314, 43, 46),
    128: (192, 369, 39, 39),
    256: (194, 360, 39, 40),
}
