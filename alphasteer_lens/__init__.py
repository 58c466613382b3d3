"""alphasteer_lens: refusal steering research on TransformerLens.

Cache residual activations, find refusal directions, build null-space projectors, fit AlphaSteer,
steer generation through hook points, and look at what happens.
"""

from alphasteer_lens.activations import Activations, cache_activations
from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.artifacts import load_steering, load_steering_with_meta, save_steering
from alphasteer_lens.benign_vectors import compliance_vector, json_vector, load_vector
from alphasteer_lens.chat import encode_chat, format_chat
from alphasteer_lens.deploy import attach
from alphasteer_lens.directions import diff_in_means, refused_minus_complied
from alphasteer_lens.evaluation import EvalSet, Method, compare_methods
from alphasteer_lens.export import to_control_vector
from alphasteer_lens.formats import PromptFormat
from alphasteer_lens.gates import (
    CalibratedAlphaSteer,
    Cast,
    GateProbe,
    conformal_threshold,
    gate_report,
)
from alphasteer_lens.generation import generate, next_token_logits
from alphasteer_lens.judges import KeywordJudge, RefusalTokens, refusal_score
from alphasteer_lens.models import HookedModel, load_model
from alphasteer_lens.nullspace import NullSpace, benign_leakage, null_space
from alphasteer_lens.prompts import PromptFileError, PromptSet, load_prompts
from alphasteer_lens.scans import Scans
from alphasteer_lens.steering import (
    ActAdd,
    Composition,
    DirectionalAblation,
    SteeringRuntime,
    steer,
)
from alphasteer_lens.storage import ArtifactError

__version__ = "0.1.0"

__all__ = [
    "ActAdd",
    "Activations",
    "AlphaSteer",
    "ArtifactError",
    "CalibratedAlphaSteer",
    "Cast",
    "Composition",
    "DirectionalAblation",
    "EvalSet",
    "GateProbe",
    "HookedModel",
    "KeywordJudge",
    "Method",
    "NullSpace",
    "PromptFileError",
    "PromptFormat",
    "PromptSet",
    "RefusalTokens",
    "Scans",
    "SteeringRuntime",
    "attach",
    "benign_leakage",
    "cache_activations",
    "compare_methods",
    "compliance_vector",
    "conformal_threshold",
    "diff_in_means",
    "encode_chat",
    "format_chat",
    "gate_report",
    "generate",
    "json_vector",
    "load_model",
    "load_prompts",
    "load_steering",
    "load_steering_with_meta",
    "load_vector",
    "next_token_logits",
    "null_space",
    "refusal_score",
    "refused_minus_complied",
    "save_steering",
    "steer",
    "to_control_vector",
]
