"""The state of a ZeroOptimizer as torch.optim's state_dict() / load_state_dict() see it: this rank's shard (its
master slices, the optimizer state of those slices, the hyperparameters), the layout they belong to, and the model
state every rank holds whole (frozen parameters, buffers), with the checks that tell what does not fit before
anything changes. checkpoint.py builds on these to save, reshard and load across ranks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from optimized.zero.partition import FlatLayout

FORMAT_VERSION = 1


class ShardedState:
    """state_dict / load_state_dict of ZeroOptimizer (mixed into it; see the module docstring).

    Reads the optimizer's stage, param_dtype, world_size, rank, module, scaler, optimizer (the inner one over the
    master slices), _flats (the FlatBuffers), _where (id of each trainable parameter), _group_names and
    _optimizer_name; load_state_dict ends with its _publish() and zero_grad()."""

    def _meta(self) -> dict:
        return {
            "version": FORMAT_VERSION,
            "stage": self.stage,
            "world_size": self.world_size,
            "rank": self.rank,
            "param_dtype": None if self.param_dtype is None else str(self.param_dtype).removeprefix("torch."),
            "optimizer": self._optimizer_name,
        }

    def layouts(self) -> list[FlatLayout]:
        return [flat.layout for flat in self._flats]

    def state_dict(self) -> dict:
        """This rank's shard: its master slices, the optimizer state of those slices, the hyperparameters, the
        layout they belong to, and the replicated model state (frozen parameters, buffers). Load it with
        load_state_dict at the same world size and rank; save_checkpoint/load_checkpoint reshard."""
        inner = self.optimizer.state_dict()
        return {
            "zero": self._meta(),
            "layouts": [flat.layout.describe() for flat in self._flats],
            "group_params": [list(names) for names in self._group_names],
            "masters": [flat.master.detach().clone() for flat in self._flats],  # a view would save its whole base
            "state": [_clone_state(inner["state"].get(i, {})) for i in range(len(self._flats))],
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in inner["param_groups"]],
            "state_dict_keys": list(self.module.state_dict(keep_vars=True)),
            "replicated": {name: t.detach().clone() for name, t in self._replicated().items()},
            "loss_scale": self.scaler.state_dict(),
        }

    def check_compatible(self, meta: dict, layouts: list[dict], replicated: Iterable[str], source: str) -> None:
        """Raise ValueError naming what differs between a saved optimizer (meta, layouts) and this one."""
        mine = self._meta()
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{source}: format version {meta.get('version')!r}, this code reads {FORMAT_VERSION}")
        for key in ("stage", "param_dtype", "optimizer"):
            if meta.get(key) != mine[key]:
                raise ValueError(
                    f"{source}: saved with {key}={meta.get(key)!r}, this optimizer has {key}={mine[key]!r}"
                )
        ours = [flat.layout.describe() for flat in self._flats]

        def by_name(lays: list[dict]) -> dict[str, tuple]:
            return {p["names"][0]: (p["shape"], ld["dtype"], ld["group"]) for ld in lays for p in ld["params"]}

        saved, current = by_name(layouts), by_name(ours)
        for name, (shape, dtype, group) in current.items():
            if name not in saved:
                raise ValueError(f"{source}: trainable parameter {name!r} of this model is not in the checkpoint "
                                 f"(a checkpoint of another model?)")
            if saved[name] != (shape, dtype, group):
                s = saved[name]
                raise ValueError(f"{source}: parameter {name!r} was saved with shape {s[0]}, dtype {s[1]}, group "
                                 f"{s[2]}; this model has shape {shape}, dtype {dtype}, group {group}")
        for name in saved:
            if name not in current:
                raise ValueError(f"{source}: parameter {name!r} is in the checkpoint but is not a trainable "
                                 f"parameter of this model (a checkpoint of another model?)")
        if layouts != ours:
            raise ValueError(f"{source}: the same parameters in another order or grouping than in this model")
        missing = sorted(set(self._replicated()) - set(replicated))
        if missing:
            raise ValueError(f"{source}: frozen parameter or buffer {missing[0]!r} is not in the checkpoint")

    def _replicated(self) -> dict[str, Tensor]:
        """Model state every rank holds whole: frozen parameters and buffers, by state_dict name."""
        return {k: v for k, v in self.module.state_dict(keep_vars=True).items() if id(v) not in self._where}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load this rank's shard written by state_dict() at the same world size; see load_checkpoint to reshard.

        Everything is checked (check_state_dict) before anything changes."""
        self.check_state_dict(state_dict)
        inner_groups = self.optimizer.state_dict()["param_groups"]
        with torch.no_grad():
            for flat, master in zip(self._flats, state_dict["masters"], strict=True):
                flat.master.copy_(master)
            replicated = self._replicated()
            for name, value in state_dict["replicated"].items():
                if name in replicated:
                    replicated[name].copy_(value)
        self.optimizer.load_state_dict({
            "state": {i: s for i, s in enumerate(state_dict["state"]) if s},
            "param_groups": [{**saved, "params": ours["params"]}
                             for saved, ours in zip(state_dict["param_groups"], inner_groups, strict=True)],
        })
        if "loss_scale" in state_dict:
            self.scaler.load_state_dict(state_dict["loss_scale"])
        self._publish()
        self.zero_grad()

    def check_state_dict(self, state_dict: dict) -> None:
        """Raise ValueError naming what in `state_dict` does not fit this optimizer (load_state_dict's checks)."""
        for key in ("zero", "layouts", "replicated", "masters", "state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"state_dict has no {key!r} entry (not a ZeroOptimizer.state_dict()?)")
        meta = state_dict["zero"]
        self.check_compatible(meta, state_dict["layouts"], state_dict["replicated"], "state_dict")
        if (meta["world_size"], meta["rank"]) != (self.world_size, self.rank):
            raise ValueError(
                f"state_dict: saved by rank {meta['rank']} of {meta['world_size']}, this is rank {self.rank} of "
                f"{self.world_size}; use save_checkpoint/load_checkpoint to load at another world size"
            )
        for flat, master in zip(self._flats, state_dict["masters"], strict=True):
            owned = flat.layout.owned_numel(self.rank)
            if tuple(master.shape) != (owned,):
                raise ValueError(f"state_dict: master slice of {flat.layout.slots[0].name!r}... has shape "
                                 f"{tuple(master.shape)}, expected ({owned},)")
        if len(state_dict["masters"]) != len(self._flats) or len(state_dict["state"]) != len(self._flats):
            raise ValueError(f"state_dict: {len(state_dict['masters'])} master slices and {len(state_dict['state'])} "
                             f"state entries, this optimizer has {len(self._flats)} flat buffers")
        for flat, state in zip(self._flats, state_dict["state"], strict=True):
            owned = flat.layout.owned_numel(self.rank)
            for k, v in state.items():
                if isinstance(v, Tensor) and v.dim() == 1 and tuple(v.shape) != (owned,):
                    raise ValueError(f"state_dict: optimizer state {k!r} of the flat buffer starting at "
                                     f"{flat.layout.slots[0].name!r} has shape {tuple(v.shape)}, expected ({owned},)")
        replicated = self._replicated()
        for name, value in state_dict["replicated"].items():
            if name in replicated and tuple(value.shape) != tuple(replicated[name].shape):
                raise ValueError(f"state_dict: {name!r} has shape {tuple(value.shape)}, the model's has "
                                 f"{tuple(replicated[name].shape)}")
        inner_groups = self.optimizer.state_dict()["param_groups"]
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(inner_groups):
            raise ValueError(f"state_dict: {len(saved_groups)} parameter groups, this optimizer has "
                             f"{len(inner_groups)}")


def _clone_state(state: dict) -> dict:
    return {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in state.items()}


