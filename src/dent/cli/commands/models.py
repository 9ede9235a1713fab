"""``dent models``: the model registry and which entries work offline; ``--layers NAME``: a model's layers."""

from __future__ import annotations

import argparse

from dent.cli.command import add_config_arguments, command, config_from_args
from dent.models import list_models
from dent.sections import ModelDataConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--layers", metavar="NAME", default=None,
                        help="list the layers (named_modules) of the named model or architecture NAME, with their "
                             "output shapes on one CIFAR-sized input: the names train.detector.layer takes")


@command("models", "list architectures and named models, and which are available offline", add_arguments,
         config=ModelDataConfig)
def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.layers is not None:
        return print_layers(args.layers, cfg)
    rows = list_models(model_dir=cfg.model.model_dir)
    width = max(len(info.name) for info in rows)
    print(f"{'name':<{width}}  {'kind':<12} {'threat':<6} {'offline':<8} description")
    for info in rows:
        offline = "yes" if info.offline_available else "no"
        print(f"{info.name:<{width}}  {info.kind:<12} {info.threat_model or '-':<6} {offline:<8} {info.description}")
    return 0


def print_layers(name: str, cfg: ModelDataConfig) -> int:
    """The layers of model ``name`` (a named model, else a freshly built architecture) and their output shapes."""
    import torch

    from dent.errors import ConfigError
    from dent.models import ARCHITECTURES, PRETRAINED, build_model, load_model

    if name in PRETRAINED:
        model = load_model(name, model_dir=cfg.model.model_dir, download=False)
    elif name in ARCHITECTURES:
        model = build_model(ARCHITECTURES.canonical(name))
    else:
        raise ConfigError(f"dent models --layers: unknown model or architecture {name!r}; named models: "
                          f"{', '.join(PRETRAINED.names())}; architectures: {', '.join(ARCHITECTURES.names())}")
    model.eval()
    shapes: dict[str, str] = {}

    def record(layer: str):
        def hook(module, inputs, out) -> None:
            shapes.setdefault(layer, str(tuple(out.shape[1:])) if torch.is_tensor(out) else type(out).__name__)
        return hook

    hooks = [module.register_forward_hook(record(layer)) for layer, module in model.named_modules() if layer]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    width = max(len(layer) for layer, _ in model.named_modules())
    for layer, module in model.named_modules():
        if layer:
            print(f"{layer:<{width}}  {type(module).__name__:<20} {shapes.get(layer, 'not called')}")
    return 0
