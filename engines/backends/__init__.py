"""What the external engines (vllm, trtllm, neuronx) share: the mapping of LMC's sampling
parameters onto theirs, and the startup checks for their package and hardware. Torch-free and
free of every engine's package: the front end and the unit tests import it."""
