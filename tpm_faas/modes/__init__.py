"""The three inference modes. Each is a :class:`~tpm_faas.modes.base.Mode` subclass."""

from tpm_faas.modes.base import Admission, Mode
from tpm_faas.modes.embed import EmbedMode
from tpm_faas.modes.intervene import InterveneMode
from tpm_faas.modes.query import QueryMode

MODES: dict[str, Mode] = {m.name: m for m in (QueryMode(), EmbedMode(), InterveneMode())}
#: The mode names, in registry order: the one list CLI choices, scopes and registration use.
MODE_NAMES: tuple[str, ...] = tuple(MODES)

__all__ = ["MODES", "MODE_NAMES", "Admission", "EmbedMode", "InterveneMode", "Mode", "QueryMode"]
