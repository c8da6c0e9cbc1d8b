"""From ``fedloom simulate``'s options to a runnable plan: workload, strategy, sampler,
transfer-learning split, evaluation and early stopping."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedloom.fleet import Fleet
from fedloom.server.crosssite import CrossSiteTable, cross_site
from fedloom.server.evaluation import Watch
from fedloom.strategies import registry
from fedloom.strategies.pipeline import Strategy
from fedloom.strategies.sampling import SAMPLERS
from fedloom.tensors import NamedTensors
from fedloom.transfer import Split, start
from fedloom.types import History
from fedloom.workloads import Workload

TABULAR = ("breast_cancer", "wine")


@dataclass
class Plan:
    options: Any  # SimulationOptions
    workload: Workload
    strategy: Strategy
    split: Split
    full_initial: NamedTensors  # every parameter, as trainers start from it
    initial: NamedTensors  # the federated ones, as the coordinator aggregates them

    def trainer(self, index: int):
        """Client ``index``'s trainer: starting from the run's initial weights, with its personal file."""
        personal = None
        if self.split.local:
            personal = Path(self.options.run_dir) / "personal" / f"client-{index}.safetensors"
        return self.workload.trainer(index, split=self.split, initial=self.full_initial, personal_path=personal)

    def fleet(self) -> Fleet:
        from fedloom.simulations.simulate import make_fleet

        o = self.options
        return make_fleet(self.trainer, num_clients=self.workload.num_clients, fleet=o.fleet,
                          ray_address=o.ray_address, num_cpus=o.num_cpus, num_gpus=o.num_gpus)

    def normalization(self, fleet: Fleet, nodes: list[str]) -> dict[str, Any]:
        """Tabular data: global feature statistics from the clients' sufficient statistics, as config."""
        if self.options.dataset not in TABULAR or self.options.normalize == "none":
            return {}
        from fedloom.preprocessing import collect_feature_stats

        return collect_feature_stats(fleet, nodes, timeout=600.0).to_config(self.options.normalize)

    def evaluator(self, fit_config: dict[str, Any]):
        full = self.workload.evaluator(fit_config) if self.options.dataset in TABULAR else self.workload.evaluator()
        if not self.split.frozen and not self.split.local:
            return full
        base = self.full_initial  # frozen parameters keep their initial values; local ones have no global value

        def evaluate(weights: NamedTensors) -> dict[str, float]:
            return full(NamedTensors({**base, **weights}))

        return evaluate

    def watch(self) -> Watch:
        o = self.options
        return Watch.create(early_stopping=o.early_stopping, patience=o.patience, min_delta=o.min_delta,
                            best_metric=o.best_metric)

    def run(self, fleet: Fleet, fit_config: dict[str, Any], *, on_round=None) -> History:
        from fedloom.simulations.simulate import simulate

        o = self.options
        return simulate(self.trainer, num_clients=self.workload.num_clients, rounds=o.rounds,
                        initial_weights=self.initial, strategy=self.strategy, fraction=o.fraction, seed=o.seed,
                        evaluate=self.evaluator(fit_config), fit_config=fit_config, eval_fraction=o.eval_fraction,
                        fleet=fleet, run_dir=o.run_dir, on_round=on_round,
                        sampler=SAMPLERS[o.sampler](fraction=o.fraction), watch=self.watch())

    def cross_site(self, fleet: Fleet, weights: NamedTensors, nodes: list[str], fit_config: dict) -> CrossSiteTable:
        sites = sorted(nodes, key=int)[: self.options.cross_site]
        return cross_site(fleet, weights, sites, config={**fit_config, "seed": self.options.seed},
                          round_=self.options.rounds + 1)


def _workload(options: Any) -> Workload:
    from fedloom.simulations import workloads

    needs_val = options.eval_fraction > 0 or options.cross_site > 0
    val = options.val_fraction or (0.2 if needs_val else 0.0)
    if options.dataset in TABULAR:
        from fedloom.tabular import tabular

        work = tabular(options.dataset, options.num_clients, scheme=options.partition, seed=options.seed,
                       alpha=options.alpha, classes_per_client=options.classes_per_client)
    else:
        work = workloads.make(options.dataset, options.num_clients, scheme=options.partition, seed=options.seed,
                              alpha=options.alpha, classes_per_client=options.classes_per_client, data=options.data,
                              synthetic_alpha=options.synthetic_alpha, synthetic_beta=options.synthetic_beta)
    return dataclasses.replace(work, val_fraction=val) if val else work


def build(options: Any) -> Plan:
    """Everything the options name, checked before any process starts."""
    workload = _workload(options)
    strategy = registry.build(options.strategy, options.params)
    if options.validate_norms:
        strategy = registry.with_norm_check(strategy, z_threshold=options.validate_norms)
    split, full = start(workload.initial_weights(options.seed), pretrained=options.pretrained,
                        freeze=options.freeze, local=options.local)
    initial = split.federated(full)
    return Plan(options, workload, strategy, split, full, initial)
