"""The config of ``dent serve``: the model, one defense entry, the ``serve`` section, the device."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

from pydantic import Field, model_validator

from dent.confbase import NON_RESULT, Section
from dent.defenses.config import DentConfig
from dent.defenses.kinds import DefenseSpec
from dent.sections import CommandConfig, DeviceName, ModelSection

PositiveInt = Annotated[int, Field(ge=1)]

#: Hosts that only this machine can reach: a service bound to one of them needs no token.
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class Isolation(str, Enum):
    """Whose inputs one call of the defense sees, and so what an answer may depend on (docs/serving.md)."""

    SAMPLE = "sample"  # a sample-wise or static defense: each answer depends on its own input only
    CLIENT = "client"  # a batch is one request's images only: a batch-wise defense adapts over one client's inputs
    SHARED = "shared"  # batches mix strangers' requests under a batch-wise defense: needs serve.allow_shared


class ServeSection(Section):
    """How the service listens, batches, limits and authenticates."""

    host: str = "127.0.0.1"  # a non-local address needs a token (token_env or token_file) or insecure_no_token
    port: Annotated[int, Field(ge=0, le=65535)] = 8000  # 0: any free port
    max_batch: PositiveInt = 32  # images per call of the defense; also the most images one request may hold
    max_wait_ms: Annotated[float, Field(ge=0)] = 10.0  # how long the oldest waiting request waits for batch-mates
    queue_size: PositiveInt = 64  # requests waiting for a batch; one more is answered 503 with Retry-After
    timeout_s: Annotated[float, Field(gt=0)] = 30.0  # a request not answered by then gets 504
    max_request_bytes: PositiveInt = 2 * 1024 * 1024  # larger bodies are refused with 413 before being read whole
    isolation: Isolation = Isolation.SAMPLE
    allow_shared: bool = False  # admit isolation 'shared' (a warning at start and in every answer)
    token_env: Optional[str] = None  # the environment variable holding the bearer token
    token_file: Optional[Path] = None  # or the file holding it (its first line)
    insecure_no_token: bool = False  # serve a non-local address without a token
    dataset: str = "cifar10"  # what the model was trained on: the expected image size and the class names

    @model_validator(mode="after")
    def _shared_needs_allow(self) -> "ServeSection":
        if self.isolation is Isolation.SHARED and not self.allow_shared:
            raise ValueError(
                "isolation 'shared' adapts a batch-wise defense over strangers' inputs, so one client's images "
                "change another's answers; set serve.allow_shared true to accept that, or use isolation 'client' "
                "(one request per batch) or 'sample' (a sample-wise defense)"
            )
        return self

    @model_validator(mode="after")
    def _one_token_source(self) -> "ServeSection":
        if self.token_env is not None and self.token_file is not None:
            raise ValueError("give the token by serve.token_env or serve.token_file, not both")
        return self

    @model_validator(mode="after")
    def _remote_needs_token(self) -> "ServeSection":
        if self.host not in LOCAL_HOSTS and self.token_env is None and self.token_file is None \
                and not self.insecure_no_token:
            raise ValueError(
                f"host {self.host!r} can be reached from other machines, so the service needs a bearer token: set "
                "serve.token_env NAME (an environment variable) or serve.token_file PATH, or serve.insecure_no_token "
                "true to serve without one"
            )
        return self


class ServeConfig(CommandConfig):
    """The config of ``dent serve``: fixed at start, never chosen by clients."""

    model: ModelSection = ModelSection()
    # One defense entry, as a value of `dent evaluate`'s `defenses:` (a kind's keys, or a DentConfig with a preset).
    # The default, dent+ without its diversity term, is sample-wise (docs/serving.md).
    defense: DefenseSpec = DentConfig(preset="dent_plus_bsi", diversity_weight=0.0)
    serve: Annotated[ServeSection, NON_RESULT] = ServeSection()
    device: Annotated[DeviceName, NON_RESULT] = "auto"

    # Another kind's entry shares no key with the default's: a file or a whole override replaces it.
    replaced_whole = frozenset({"defense"})
    single_entries = ("defense",)
