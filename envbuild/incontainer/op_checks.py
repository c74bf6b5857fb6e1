"""GPU op checks for `envbuild smoke --level ops`: each compiled library's ops, forward and
backward on the GPU, against a reference (its CPU path, its own PyTorch path, or plain math).

Run inside images by smoke.py: Python 3.8+, stdlib and torch (plus the library checked).
"""


def _close(a, b, tol):
    return float((a.float() - b.float()).abs().max()) <= tol


def check_mmcv():
    import torch
    from mmcv.ops import nms, roi_align
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=torch.float32, device="cuda")
    scores = torch.tensor([0.9, 0.8, 0.7], device="cuda")
    dets, keep = nms(boxes, scores, 0.5)
    assert sorted(keep.tolist()) == [0, 2], "nms kept %s, expected [0, 2]" % keep.tolist()
    feat = torch.randn(1, 4, 16, 16, device="cuda", requires_grad=True)
    rois = torch.tensor([[0, 2.0, 2.0, 10.0, 10.0]], device="cuda")
    out = roi_align(feat, rois, (4, 4), 1.0, 2, "avg", True)
    out.sum().backward()
    ref = roi_align(feat.detach().cpu(), rois.cpu(), (4, 4), 1.0, 2, "avg", True)
    assert _close(out.detach().cpu(), ref, 1e-4) and feat.grad is not None, "roi_align differs from its CPU path"
    done = ["nms", "roi_align"]
    try:  # the op BEV detectors lean on (BEVFormer/MapTR encoders); in mmcv-full >= 1.3
        from mmcv.ops.multi_scale_deform_attn import (MultiScaleDeformableAttnFunction,
                                                      multi_scale_deformable_attn_pytorch)
    except ImportError:
        MultiScaleDeformableAttnFunction = None
    if MultiScaleDeformableAttnFunction is not None:
        shapes = torch.tensor([[6, 8], [3, 4]], dtype=torch.long, device="cuda")
        sizes = shapes[:, 0] * shapes[:, 1]
        starts = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
        value = torch.rand(1, int(sizes.sum()), 2, 8, device="cuda", requires_grad=True)
        where = torch.rand(1, 10, 2, 2, 4, 2, device="cuda")
        weight = torch.rand(1, 10, 2, 2, 4, device="cuda")
        weight = weight / weight.sum((-1, -2), keepdim=True)
        out = MultiScaleDeformableAttnFunction.apply(value, shapes, starts, where, weight, 64)
        out.sum().backward()
        value_ref = value.detach().clone().requires_grad_(True)
        ref = multi_scale_deformable_attn_pytorch(value_ref, shapes, where, weight)
        ref.sum().backward()
        assert _close(out, ref, 1e-4), "multi-scale deformable attention forward differs from mmcv's PyTorch path"
        assert _close(value.grad, value_ref.grad, 1e-3), "multi-scale deformable attention backward differs"
        done.append("multi_scale_deform_attn")
    return "%s forward/backward match the reference" % ", ".join(done)


def check_flash_attn():
    # a wheel built with --trim-kernels has some head dims only: the others raise before any kernel runs
    for d in (64, 32, 128, 96, 160, 192, 224, 256):
        try:
            return _check_flash_attn(d)
        except RuntimeError as exc:
            if "compiled by envbuild for head dims" not in str(exc):
                raise
    raise AssertionError("flash attention: no head dim compiled")


def _check_flash_attn(d):
    import torch
    b, s, h = 2, 128, 4
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    try:  # flash-attn 2.x
        from flash_attn import flash_attn_func
        out = flash_attn_func(q, k, v, causal=True)
    except ImportError:  # flash-attn 1.x: the variable-length API only
        from flash_attn.flash_attn_interface import flash_attn_unpadded_func
        cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device="cuda")
        flat = [t.reshape(b * s, h, d) for t in (q, k, v)]
        out = flash_attn_unpadded_func(flat[0], flat[1], flat[2], cu, cu, s, s, 0.0, causal=True).reshape(b, s, h, d)
    out.float().sum().backward()
    att = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * d ** -0.5
    mask = torch.triu(torch.ones(s, s, device="cuda", dtype=torch.bool), 1)
    ref = torch.einsum("bhqk,bkhd->bqhd", att.masked_fill(mask, float("-inf")).softmax(-1), v.float())
    assert _close(out, ref, 2e-2), "flash attention differs from a float32 reference"
    assert q.grad is not None and bool(torch.isfinite(q.grad).all()), "flash attention backward"
    return "flash attention forward/backward match a float32 reference (head dim %d)" % d


def check_torch_scatter():
    import torch
    from torch_scatter import scatter
    src = torch.arange(6, dtype=torch.float32, device="cuda", requires_grad=True)
    index = torch.tensor([0, 0, 1, 1, 2, 2], device="cuda")
    out = scatter(src, index, reduce="sum")
    out.sum().backward()
    assert out.tolist() == [1.0, 5.0, 9.0] and src.grad.tolist() == [1.0] * 6, "scatter sum"
    return "scatter sum forward/backward"


def check_torch_cluster():
    """radius_graph on the GPU against the brute-force distance matrix on the CPU."""
    import torch
    from torch_cluster import radius_graph
    gen = torch.Generator().manual_seed(0)
    pos = torch.rand(64, 3, generator=gen)
    edges = radius_graph(pos.cuda(), r=0.3, loop=False, max_num_neighbors=64).cpu()
    dist = torch.cdist(pos, pos)
    want = {(j, i) for i in range(64) for j in range(64) if i != j and dist[i, j] <= 0.3}
    got = set(zip(edges[0].tolist(), edges[1].tolist()))
    assert got == want, "radius_graph found %d edges, the distance matrix %d" % (len(got), len(want))
    return "radius_graph vs distance matrix (%d edges)" % len(want)


def check_torch_sparse():
    """SparseTensor @ dense on the GPU, forward and backward, against the dense product."""
    import torch
    from torch_sparse import SparseTensor
    gen = torch.Generator().manual_seed(0)
    dense = torch.rand(32, 32, generator=gen) * (torch.rand(32, 32, generator=gen) > 0.8)
    x = torch.rand(32, 8, generator=gen).cuda().requires_grad_()
    out = SparseTensor.from_dense(dense.cuda()).matmul(x)
    out.sum().backward()
    ref = dense.cuda() @ x.detach()
    assert _close(out, ref, 1e-4), "sparse matmul differs from dense"
    assert _close(x.grad, dense.cuda().t() @ torch.ones(32, 8, device="cuda"), 1e-4), "sparse matmul backward"
    return "SparseTensor matmul forward/backward vs dense"


def check_spconv():
    """Submanifold conv on a fully active grid with every weight 1/2: each output is 1/2 x
    channels x the voxel's neighbour count, whatever the weight layout of the spconv version."""
    import torch
    import importlib
    import spconv
    # spconv 1.x has its layers at the top level; 2.x in spconv.pytorch (an import error there
    # is the finding, not a reason to fall back)
    sp = spconv if hasattr(spconv, "SubMConv3d") else importlib.import_module("spconv.pytorch")
    n, cin, cout = 6, 4, 2
    grid = torch.stack(torch.meshgrid(*[torch.arange(n)] * 3), -1).reshape(-1, 3)
    coords = torch.cat((torch.zeros(len(grid), 1, dtype=torch.long), grid), 1).int().cuda()
    feats = torch.ones(len(grid), cin, device="cuda", requires_grad=True)
    conv = sp.SubMConv3d(cin, cout, 3, bias=False, indice_key="smoke").cuda()
    with torch.no_grad():
        conv.weight.fill_(0.5)
    out = conv(sp.SparseConvTensor(feats, coords, [n, n, n], 1))
    ones = torch.ones(1, 1, n, n, n, device="cuda")
    count = torch.nn.functional.conv3d(ones, torch.ones(1, 1, 3, 3, 3, device="cuda"), padding=1)[0, 0]
    near = count[out.indices[:, 1].long(), out.indices[:, 2].long(), out.indices[:, 3].long()]
    assert _close(out.features, (0.5 * cin * near)[:, None].expand(-1, cout), 1e-3), "SubMConv3d forward"
    out.features.sum().backward()
    assert _close(feats.grad, (0.5 * cout * count.flatten())[:, None].expand(-1, cin), 1e-3), "SubMConv3d backward"
    return "SubMConv3d forward/backward match a dense reference"


def check_torchvision():
    import torch
    from torchvision.ops import nms, roi_align
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7])
    keep = nms(boxes.cuda(), scores.cuda(), 0.5)
    assert keep.tolist() == nms(boxes, scores, 0.5).tolist() == [0, 2], "nms kept %s" % keep.tolist()
    feat = torch.randn(1, 4, 16, 16, device="cuda", requires_grad=True)
    rois = torch.tensor([[0, 2.0, 2.0, 10.0, 10.0]], device="cuda")
    out = roi_align(feat, rois, (4, 4), 1.0, 2, True)
    out.sum().backward()
    assert _close(out.detach().cpu(), roi_align(feat.detach().cpu(), rois.cpu(), (4, 4), 1.0, 2, True), 1e-4)
    assert feat.grad is not None and bool(torch.isfinite(feat.grad).all())
    return "nms and roi_align forward/backward match the CPU path"


# import name of the package -> its check
OP_CHECKS = {"mmcv": check_mmcv, "flash_attn": check_flash_attn, "torch_scatter": check_torch_scatter,
             "torch_cluster": check_torch_cluster, "torch_sparse": check_torch_sparse,
             "spconv": check_spconv, "torchvision": check_torchvision}
