"""flowertune-llm: a FlowerTune-style Flower app whose aggregation is florana's."""
