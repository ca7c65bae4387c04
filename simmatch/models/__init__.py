"""Networks: torchvision ResNet trunks with a classifier and a projection head, and EMA teachers."""
from simmatch.models.ema import EMA, ema_update
from simmatch.models.network import Network, build_network, network_for

__all__ = ["EMA", "Network", "build_network", "ema_update", "network_for"]
