"""Static ConPET (METHOD.md §3): one shared LoRA carried across tasks (EMR, EA-EMR, CRL, EWC, LwF).

Each flavour pairs a method here with a data callback (episodic memory or dynamic replay); EWC and LwF are the
replay-free baselines.
"""
