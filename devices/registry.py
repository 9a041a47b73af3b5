"""The list of models. Adding a model means adding its module here; everything else picks it up."""

from __future__ import annotations

from devices import contec_cms50, masimo_ascii1, nonin, suntech_advantage
from devices.base import Model

MODELS: dict[str, Model] = {
    m.spec.model: m for m in (masimo_ascii1.MODEL, *nonin.MODELS, contec_cms50.MODEL, suntech_advantage.MODEL)
}


class UnknownModelError(KeyError):
    def __str__(self) -> str:
        return f"unknown model {self.args[0]!r}; known models: {', '.join(sorted(MODELS))}"


def get_model(model_id: str) -> Model:
    try:
        return MODELS[model_id]
    except KeyError:
        raise UnknownModelError(model_id) from None
