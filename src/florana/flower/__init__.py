"""Flower runtime: the same federation as the in-process engine, with clients on Flower SuperNodes.

`client.app` is the ClientApp (local training through the engine's `Federation.local_update`), `server.app` the
ServerApp (a FedAvg subclass whose aggregation is florana's), `simulation.run` the one-command Ray simulation.
"""
