"""Smoke level "model": import the model's own code the way its train script does, build its
network from the catalog's construct recipe (argparse, training config or the catalog's own
lines), count parameters, and optionally run one synthetic training step (train_steps.py) and
judge its loss and grads.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import struct
import sys

from smoke_common import HERE, result


def dotted(path):
    """The object a dotted path names: the longest importable module, then attributes
    ("mmengine.Config.fromfile")."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            if cut == 1:
                raise
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj


def write_arrays(specs):
    """Zero float32 .npy files ("path.npy=AxB", relative to the working folder) where none exists:
    inputs the network reads when it is built. Written with the stdlib (the .npy v1.0 layout)."""
    made = []
    for spec in specs:
        path, dims = spec.split("=")
        shape = tuple(int(d) for d in dims.split("x"))
        if os.path.exists(path):
            continue  # the model's own file: never replaced
        header = "{'descr': '<f4', 'fortran_order': False, 'shape': (%s), }" % "".join("%d," % d for d in shape)
        header += " " * (63 - (10 + len(header)) % 64) + "\n"  # pad so the data starts on a 64-byte boundary
        count = 1
        for d in shape:
            count *= d
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1"))
            fh.write(bytes(4 * count))
        made.append(spec)
    return made


def construct_argparse(recipe):
    """(network, what built it), or (None, why not)."""
    cls = getattr(importlib.import_module(recipe["module"]), recipe["object"])
    parser = argparse.ArgumentParser(prog=recipe["object"])
    getattr(cls, recipe["args_hook"])(parser)
    try:
        ns = parser.parse_args(list(recipe.get("args") or []))
    except SystemExit:  # argparse exits on arguments it does not take; its message went to stderr
        return None, "%s's parser refused the catalog's construct args %s" % (recipe["object"], recipe.get("args"))
    return cls(**vars(ns)), "%s.%s" % (recipe["module"], recipe["object"])


def construct_from_config(recipe):
    """The network the training config describes, built by the model's own builder."""
    if not os.path.isfile(recipe["config"]):
        return None, "no config %s in the model source" % recipe["config"]
    cfg = dotted(recipe["loader"])(recipe["config"])
    kwargs = dict((key, cfg.get(key)) for key in recipe.get("cfg_kwargs") or [])
    return dotted(recipe["builder"])(cfg["model"], **kwargs), "%s(%s: model)" % (recipe["builder"], recipe["config"])


def construct_from_code(recipe):
    """The network the catalog's own lines bind to `model` (kind "python")."""
    scope = {"__name__": "envbuild_construct"}
    exec(compile(recipe["code"], "[construct] code", "exec"), scope)
    net = scope.get("model")
    if not hasattr(net, "parameters"):
        return None, "the construct code bound %s to `model`, not a network" % type(net).__name__
    return net, "[construct] code"


def level_model(plan, args):
    """Import the model's own code the way its train script does and build its network from
    its own arguments (the catalog's construct recipe); report the parameter count."""
    recipe = plan.get("construct")
    if not recipe:
        return result("skipped", reason="the catalog has no construct recipe for %s" % plan["model"])
    root = args.workdir
    if not os.path.isdir(root):
        return result("failed", reason="no model source at %s" % root)
    if root not in sys.path:
        sys.path.insert(0, root)
    here = os.getcwd()
    os.chdir(root)  # repos read configs and assets relative to their root, as their train script runs
    try:
        made = write_arrays(recipe.get("arrays") or [])
        for name in recipe.get("imports") or []:
            importlib.import_module(name)
        if recipe["kind"] == "argparse":
            net, built = construct_argparse(recipe)
        elif recipe["kind"] == "config":
            net, built = construct_from_config(recipe)
        elif recipe["kind"] == "python":
            net, built = construct_from_code(recipe)
        else:
            return result("failed", reason="unknown construct kind %r" % recipe["kind"])
        if net is None:
            return result("failed", reason=built)
    finally:
        os.chdir(here)
    params = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    out = dict(object=built, parameters=params, trainable=trainable, imports=list(recipe.get("imports") or []))
    if made:
        out["synthetic_arrays"] = made
    if params <= 0:
        return result("failed", reason="the network has no parameters", **out)
    if recipe.get("step"):
        out["step"] = train_step(recipe["step"], net, root)
        if out["step"].get("problem"):
            return result("failed", reason="training step %s: %s" % (recipe["step"], out["step"]["problem"]), **out)
    return result("passed", **out)


def train_step(name, net, root):
    """One synthetic training step (train_steps.py beside this file) with the model's root as
    the working folder; what it measured, plus "problem" when forward/backward did not work."""
    import torch
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import train_steps
    here = os.getcwd()
    os.chdir(root)
    try:
        measured = train_steps.STEPS[name](net, torch)
    finally:
        os.chdir(here)
    if not math.isfinite(measured["loss"]):
        measured["problem"] = "the loss is %s" % measured["loss"]
    elif measured["nonfinite_grads"]:
        measured["problem"] = "%d parameter(s) got a non-finite gradient" % measured["nonfinite_grads"]
    elif not measured["grads"]:
        measured["problem"] = "backward reached no parameter"
    return measured
