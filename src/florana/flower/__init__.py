"""Flower runtime: the same federation as the in-process engine, with clients on Flower SuperNodes.

`client.app` is the ClientApp (local training through the engine's `Federation.local_update`), `server.app` the
ServerApp (a FedAvg subclass whose aggregation is florana's), `simulation.run` the one-command Ray simulation.
`strategies.FloranaLoRA` is apart from these: a drop-in strategy for Flower apps of one's own (FedAvg whose LoRA
aggregation is a florana method), which needs no florana run config.
"""
