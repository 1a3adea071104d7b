"""Whole experiments, one readable file each; ``trajstore run NAME`` dispatches here.

``mnist1d`` (the embedded default), ``digits``, ``cifar10-MODEL`` / ``cifar100-MODEL`` (the
paper's CIFAR set-ups, data from a local folder), ``ablation`` (the shape of the paper's Table 1 on
MNIST-1D) and ``demo`` (a store tour in seconds).
"""

from __future__ import annotations

from typing import Any

__all__ = ["EXPERIMENTS", "experiment_config", "run_experiment"]

EXPERIMENTS = ("mnist1d", "digits", "cifar10-resnet20", "cifar10-resnet32", "cifar100-wrn-40-10",
               "cifar100-inception-v4", "cifar10-MODEL", "cifar100-MODEL", "ablation", "demo")


def experiment_config(name: str) -> Any:
    """The default config of a named experiment."""
    if name == "mnist1d":
        from . import mnist1d

        return mnist1d.Config()
    if name == "digits":
        from . import digits

        return digits.Config()
    if name.startswith(("cifar10-", "cifar100-")):
        from . import cifar

        return cifar.config_for(name)
    raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")


def run_experiment(name: str, *, out: str | None = None, seed: int = 0, seeds: int | None = None,
                   overrides: dict[str, str] | None = None, data_root: str | None = None) -> dict[str, Any]:
    """Run an experiment end to end (resuming what ``out`` already holds). The whole config is
    checked first (:func:`pipelines.validate.configure`): a mistake is refused before anything is
    written or trained."""
    if name == "demo":
        from . import demo

        if overrides or data_root:
            from .validate import ConfigError

            raise ConfigError("the demo takes no --set or --data-root (only --out and --seed)")
        return demo.main(demo.DemoConfig(out=out or "runs/demo", seed=seed))
    if name == "ablation":
        from . import ablation

        if data_root:
            from .validate import ConfigError

            raise ConfigError("the ablation runs on MNIST-1D: it takes no --data-root")
        return ablation.main(ablation.configure(overrides, out=out, seed=seed, seeds=seeds))
    from .experiment import run
    from .validate import configure

    return run(configure(name, overrides, seed=seed, seeds=seeds, out=out, data_root=data_root))
