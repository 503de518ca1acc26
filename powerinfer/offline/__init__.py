"""The offline half: profiling, predictor training, placement, artifact building and ReLU-fication."""
