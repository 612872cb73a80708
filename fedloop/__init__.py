"""fedloop: the compact federated LoRA loop on a real pre-trained transformer.

Not yet implemented: see the issue tracker ("fedloop: the compact federated LoRA loop").
"""
