"""The one config system: every section of a run, validated on construction.

* :mod:`.adapter` -- :class:`AdapterConfig` (``adapter:``): targets, experts,
  routing, auxiliary losses;
* :mod:`.data` -- :class:`DataConfig` (``data:``) and :class:`DatasetConfig`
  (an entry of ``data.datasets``);
* :mod:`.run` -- :class:`ModelConfig`, :class:`TrainConfig`,
  :class:`ParallelConfig`, :class:`OutputConfig` and the whole :class:`RunConfig`;
  loading YAML/JSON with ``section.field=value`` overrides;
* :mod:`.deepspeed` -- the DeepSpeed JSON read and checked against the run config
  (the keys it owns filled in where absent or ``"auto"``);
* :mod:`.fields` -- the one ``from_dict`` (:func:`section_from_dict`) and the one
  choice check (:func:`check_choice`);
* :mod:`.coerce` -- values converted to their field's annotated type.

Every choice is a tuple defined once beside its section (``ROUTERS``,
``LOSS_REDUCTIONS``, ``FORMATS``, ...) and checked once, on construction. Every
user-input error reads ``section.field=value: ...``.
"""

from loramoe_ds.config.adapter import (
    AUX_LOSS_SCOPES,
    LBC_VARIANTS,
    LORAMOE_TARGETS,
    MOLA_TARGETS,
    ROUTERS,
    AdapterConfig,
)
from loramoe_ds.config.data import FORMATS, LOSS_ON, TEMPLATES, DataConfig, DatasetConfig
from loramoe_ds.config.deepspeed import DS_AUTO_KEYS, load_ds_config, resolve_ds_config
from loramoe_ds.config.fields import check_choice, section_from_dict
from loramoe_ds.config.run import (
    LOSS_REDUCTIONS,
    PRECISIONS,
    REPORT_TO,
    ModelConfig,
    OutputConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    load_run_config,
)

__all__ = [
    "AUX_LOSS_SCOPES",
    "DS_AUTO_KEYS",
    "FORMATS",
    "LBC_VARIANTS",
    "LORAMOE_TARGETS",
    "LOSS_ON",
    "LOSS_REDUCTIONS",
    "MOLA_TARGETS",
    "PRECISIONS",
    "REPORT_TO",
    "ROUTERS",
    "TEMPLATES",
    "AdapterConfig",
    "DataConfig",
    "DatasetConfig",
    "ModelConfig",
    "OutputConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "check_choice",
    "load_ds_config",
    "load_run_config",
    "resolve_ds_config",
    "section_from_dict",
]
