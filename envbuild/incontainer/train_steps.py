"""One training step on a small synthetic batch, per model family: smoke's model level runs it
on the CPU where the model's ops have a CPU path, to prove forward and backward work in the
image (not only that the network constructs). Each step takes the constructed network and the
torch module and returns {"loss": float, "grads": parameters that got a finite gradient}.

Runs inside images: Python 3.8+, stdlib and torch (plus the model's own dependencies).
The batches are shaped like the model's dataset output, with small made-up sizes and values.
"""

import math


def qcnet_argoverse2(net, torch):
    """QCNet (Lightning module): a batch shaped like its Argoverse 2 dataset items, with the
    target its own TargetBuilder transform adds, then its own training_step."""
    from torch_geometric.data import Batch, HeteroData
    from transforms import TargetBuilder

    gen = torch.Generator().manual_seed(0)
    steps = net.num_historical_steps + net.num_future_steps
    agents, polygons, points_per_polygon = 4, 3, 5
    points = polygons * points_per_polygon

    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    # agents drive forward at a few m/s from nearby starts: positions stay inside every radius
    t = torch.arange(steps, dtype=torch.float) * 0.1
    position = torch.zeros(agents, steps, 3)
    position[..., 0] = rand(agents, 1) * 10 + t * 5
    position[..., 1] = rand(agents, 1) * 10
    velocity = torch.zeros(agents, steps, 3)
    velocity[..., 0] = 5.0
    valid = torch.ones(agents, steps, dtype=torch.bool)
    agent = {
        "num_nodes": agents, "av_index": agents - 1, "valid_mask": valid, "predict_mask": valid.clone(),
        "id": ["agent%d" % i for i in range(agents)],
        "type": torch.zeros(agents, dtype=torch.uint8),
        "category": torch.full((agents,), 3, dtype=torch.uint8),
        "position": position, "heading": torch.zeros(agents, steps), "velocity": velocity,
    }
    polygon = {
        "num_nodes": polygons, "position": torch.cat([rand(polygons, 2) * 20, torch.zeros(polygons, 1)], dim=1),
        "orientation": rand(polygons) * 2 * math.pi - math.pi, "height": torch.zeros(polygons),
        "type": torch.zeros(polygons, dtype=torch.uint8), "is_intersection": torch.zeros(polygons, dtype=torch.uint8),
    }
    point = {
        "num_nodes": points, "position": torch.cat([rand(points, 2) * 20, torch.zeros(points, 1)], dim=1),
        "orientation": rand(points) * 2 * math.pi - math.pi, "magnitude": rand(points) + 0.5,
        "height": torch.zeros(points), "type": torch.zeros(points, dtype=torch.uint8),
        "side": torch.full((points,), 2, dtype=torch.uint8),
    }
    data = HeteroData({
        "scenario_id": "synthetic", "city": "synthetic", "agent": agent, "map_polygon": polygon, "map_point": point,
        ("map_point", "to", "map_polygon"): {"edge_index": torch.stack(
            [torch.arange(points), torch.arange(polygons).repeat_interleave(points_per_polygon)])},
        ("map_polygon", "to", "map_polygon"): {"edge_index": torch.tensor([[0, 1], [1, 2]]),
                                               "type": torch.tensor([2, 2], dtype=torch.uint8)},
    })
    data = TargetBuilder(net.num_historical_steps, net.num_future_steps)(data)
    batch = Batch.from_data_list([data])
    net.train()
    loss = net.training_step(batch, 0)
    loss.backward()
    return _outcome(net, loss)


def _outcome(net, loss):
    grads = [p for p in net.parameters() if p.grad is not None]
    finite = sum(1 for p in grads if bool(p.grad.isfinite().all()))
    return {"loss": float(loss.detach()), "grads": finite, "nonfinite_grads": len(grads) - finite}


# The names the catalog's [construct] step may use.
STEPS = {"qcnet-argoverse2": qcnet_argoverse2}
