"""The client's typed answers (``ttaserve_client.models``) against the server's OpenAPI: the same fields,
the same required ones, so neither can change without the other."""

from __future__ import annotations

import pytest
from pydantic import BaseModel
from ttaserve_client import models

PAIRS = [
    (models.Classification, "ClassifyResponse"),
    (models.Result, "Result"),
    (models.Prediction, "Prediction"),
    (models.Adaptation, "Adaptation"),
    (models.Ensemble, "Ensemble"),
    (models.ZeroShotView, "ZeroShotView"),
    (models.ModelRef, "ModelRef"),
    (models.LabelSet, "LabelSetOut"),
    (models.Calibration, "CalibrationOut"),
    (models.CalibrationFit, "CalibrationFit"),
    (models.FittedCalibration, "FittedCalibration"),
    (models.HeldOut, "HeldOut"),
    (models.ModelInfo, "ModelInfo"),
    (models.Method, "MethodInfo"),
    (models.Methods, "MethodList"),
    (models.SessionReport, "SessionReport"),
    (models.Session, "SessionOut"),
    (models.SessionState, "SessionState"),
    (models.SessionMethods, "SessionMethods"),
    (models.SessionMethod, "SessionMethodInfo"),
    (models.Job, "JobOut"),
]


@pytest.mark.parametrize(("model", "component"), PAIRS, ids=[c for _, c in PAIRS])
def test_the_client_reads_every_field_the_server_documents(client, model: type[BaseModel], component: str):
    schema = client.get("/openapi.json").json()["components"]["schemas"][component]
    assert set(model.model_fields) == set(schema["properties"]), f"{model.__name__} against {component}"
    required = {name for name, field in model.model_fields.items() if field.is_required()}
    assert required <= set(schema.get("required", [])), f"{model.__name__} requires what {component} may omit"
