"""Test-only torchvision stub: FX feature extraction placeholders (raise when called)."""
from .._placeholder import placeholder

create_feature_extractor = placeholder(__name__, "create_feature_extractor")
get_graph_node_names = placeholder(__name__, "get_graph_node_names")
