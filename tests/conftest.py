import torch

# The test models are tiny: intra-op threads only add contention on the 2-core CI machine.
torch.set_num_threads(1)
