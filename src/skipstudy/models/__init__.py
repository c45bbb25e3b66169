"""Skip-configurable networks: builders ``fn(num_classes, in_channels=3, **options) -> nn.Module``.

Each ``conf/model/<name>.yaml`` targets one builder here; ``num_classes`` and
``in_channels`` come from the dataset at instantiation time.
"""

from skipstudy.models.mini import mini

__all__ = ["mini"]
