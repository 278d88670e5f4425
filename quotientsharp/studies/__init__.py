"""Studies: populations of trained models, their sharpness, and its rank correlation with generalization."""
