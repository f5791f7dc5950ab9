import torch

# the tests use small tensors, where one thread is faster than two fighting over a 2-core machine
torch.set_num_threads(1)
