"""The round loop: sampling, local training, aggregation, evaluation, ledger, checkpoint and resume."""
