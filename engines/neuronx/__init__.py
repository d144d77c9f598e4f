"""option.rolling_batch=neuronx: AWS neuronx-distributed-inference (engine.py). Written against
AWS's documented API; it has not run on LMC's machines (no Neuron device there)."""
