"""The run's HParams summary, led by the study: TensorBoard's HParams tab sorts its columns by
``(not differs, name)``, and every run's experiment summary says no key differs, so ~80 keys
came alphabetically (``checkpoint.*`` first). Here the keys a sweep varies, the ``overrides``
column and ``model.*`` are marked as differing, so they lead; the rest follow, kept."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

SWEEP_FILE = "multirun.yaml"  # Hydra writes it into the sweep directory before the first job
STUDY_PREFIXES = ("model.",)


def sweep_keys(run_dir: str | Path) -> list[str]:
    """The keys the sweep holding ``run_dir`` varies (command line and ``hydra.sweeper.params``),
    read from the sweep's ``multirun.yaml`` with Hydra's own parser; empty for a single run."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    path = Path(run_dir).parent / SWEEP_FILE
    if not path.is_file():
        return []
    try:
        hydra = (yaml.safe_load(path.read_text()) or {}).get("hydra") or {}
        items = [*map(str, (hydra.get("overrides") or {}).get("task") or []),
                 *(f"{k}={v}" for k, v in ((hydra.get("sweeper") or {}).get("params") or {}).items())]
        parsed = OverridesParser.create().parse_overrides(items)
    except Exception as err:  # noqa: BLE001 - the sweep ran with them; a failure here only loses the order
        log.debug("could not read the sweep's overrides in %s: %s", path, err)
        return []
    return list(dict.fromkeys(o.key_or_group for o in parsed if o.is_sweep_override()))


def lead_keys(hparams: dict[str, Any], varied: list[str]) -> list[str]:
    """What leads the HParams table: the varied keys, ``overrides``, then ``model.*``."""
    lead = [k for k in varied if k in hparams] + [k for k in ("overrides",) if k in hparams]
    lead += [k for k in hparams if k.startswith(STUDY_PREFIXES)]
    return list(dict.fromkeys(lead))


def hparams_summaries(hparams: dict[str, Any], metrics: dict[str, float], lead: list[str]) -> list:
    """torch's HParams summaries (experiment, session start, session end) for ``hparams`` in the
    order ``lead`` then the rest, with ``differs`` set on the ``lead`` keys."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
    from torch.utils.tensorboard.summary import hparams as torch_hparams

    ordered = {k: hparams[k] for k in lead} | {k: v for k, v in hparams.items() if k not in lead}
    experiment, start, end = torch_hparams(ordered, metrics)
    value = experiment.value[0]
    data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in lead
    value.metadata.plugin_data.content = data.SerializeToString()
    return [experiment, start, end]
