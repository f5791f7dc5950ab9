import os

import torch
from hypothesis import settings

# minimoe.kernels runs its Triton kernels in the interpreter on CPU, which works only if
# TRITON_INTERPRET=1 is set before anything (torch's FLOP counter, say) imports triton.language
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the tests use small tensors, where one thread is faster than two fighting over a 2-core machine
torch.set_num_threads(1)

# the suite runs beside other workers (pytest-xdist), so an example's time says nothing: no deadline
settings.register_profile("minimoe", deadline=None)
settings.load_profile("minimoe")
