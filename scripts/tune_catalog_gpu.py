"""Time the catalog forward kernel's block configurations on a CUDA device (tuning aid).

Usage: python3 scripts/tune_catalog_gpu.py [--n 64 512] [--v 1000000]
Prints one line per configuration: median ms, GB/s (table read once) and % of the measured
device-to-device copy bandwidth, next to the plain PyTorch path and the default config.
"""
import argparse
import itertools

import torch
from triton.testing import do_bench

from r2ec_fast.kernels import catalog as kern
from r2ec_fast.ops import reference_trainer_rewards, score_catalog
from r2ec_fast.ops.catalog import _prepare


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() / ms / 1e6  # GB/s, bytes read + written


def tune_backward(user, items, target, exclude, table_gb, bw):
    """User-gradient kernel (what catalog_log_prob's backward runs when items need no grad)."""
    from r2ec_fast.ops import catalog_log_prob

    call = _prepare(user, items, target, exclude, 0.02, "cosine", 0, False)
    u = torch.nn.functional.normalize(user.float(), dim=-1).to(items.dtype)
    lse = torch.zeros(user.shape[0], device="cuda")
    g = torch.ones(user.shape[0], device="cuda")
    rows = []
    h = user.float().requires_grad_()
    ms = do_bench(lambda: catalog_log_prob(h, items, target, exclude).sum().backward(),
                  warmup=3, rep=20, return_mode="median")
    rows.append(("catalog_log_prob fwd+bwd, default (whole op)", ms))
    grid = itertools.product([64], [64, 128, 256], [64, 128], [4, 8], [1, 4])
    for bn, bv, bd, nw, depth in grid:
        cfg = dict(block_n=bn, block_v=bv, block_d=bd, num_warps=nw, num_stages=3,
                   programs_per_sm=depth)
        try:
            ms = do_bench(lambda: kern.catalog_backward(u, items, call.target, lse, g,
                                                        call.exclude, 50.0, True, True, False,
                                                        cfg),
                          warmup=3, rep=20, return_mode="median")
        except Exception as e:
            print(f"  {cfg}: failed ({type(e).__name__})")
            continue
        rows.append((f"backward kernel {cfg}", ms))
    print(f"\nbackward N={user.shape[0]} table {table_gb:.2f} GB")
    for name, ms in sorted(rows, key=lambda r: r[1]):
        print(f"  {ms:8.3f} ms  {table_gb / ms * 1e3:7.0f} GB/s  {name}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--v", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=2304)
    ap.add_argument("--backward", action="store_true",
                    help="time the user-gradient kernel's configurations instead")
    ap.add_argument("--focused", action="store_true",
                    help="only the candidate configs, each with raw rows / a pre-normalised "
                         "table and with / without exclusion")
    args = ap.parse_args()
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw:.0f} GB/s")
    torch.manual_seed(0)
    items = torch.randn(args.v, args.d, device="cuda", dtype=torch.bfloat16)
    table_gb = items.numel() * items.element_size() / 1e9
    for n in args.n:
        user = torch.randn(n, args.d, device="cuda", dtype=torch.bfloat16)
        target = torch.randint(0, args.v, (n,), device="cuda")
        exclude = torch.randint(-1, args.v, (n, 20), device="cuda")
        rows = []
        if args.backward:
            tune_backward(user, items, target, exclude, table_gb, bw)
            continue
        if n * args.v * 4 < 8e9:
            ms = do_bench(lambda: reference_trainer_rewards(user, items, target, exclude),
                          warmup=3, rep=20, return_mode="median")
            rows.append(("plain torch (materialise+mask+softmax+topk1000)", ms))
        ms = do_bench(lambda: score_catalog(user, items, target, exclude, backend="torch"),
                      warmup=3, rep=20, return_mode="median")
        rows.append(("ours torch (chunked)", ms))
        ms = do_bench(lambda: score_catalog(user, items, target, exclude, backend="triton"),
                      warmup=5, rep=50, return_mode="median")
        rows.append(("ours triton default (whole op)", ms))
        call = _prepare(user, items, target, exclude, 0.02, "cosine", 0, False)
        u = torch.nn.functional.normalize(user.float(), dim=-1).to(items.dtype)
        t = torch.zeros(n, device="cuda")
        if args.focused:
            grid = [(64, 64, 128, 4, 4), (64, 64, 256, 4, 3), (64, 64, 64, 4, 6),
                    (64, 128, 128, 8, 3), (32, 64, 128, 4, 4)] if n <= 64 else [
                    (128, 128, 64, 4, 3), (128, 128, 64, 4, 4), (128, 64, 128, 4, 4),
                    (128, 128, 128, 8, 3)]
            variants = [(True, True), (False, True), (True, False), (False, False)]
        else:
            grid = [c for c in itertools.product([64] if n <= 64 else [64, 128], [64, 128, 256],
                                                 [64, 128], [4, 8], [3, 4]) if c[0] * c[1] <= 128 * 128]
            variants = [(True, True)]
        for (bn, bv, bd, nw, ns), (normalize, with_excl) in itertools.product(grid, variants):
            cfg = dict(block_n=bn, block_v=bv, block_d=bd, num_warps=nw, num_stages=ns)
            excl = call.exclude if with_excl else None
            try:
                ms = do_bench(lambda: kern.catalog_forward(u, items, call.target, t, excl,
                                                           50.0, normalize, 0, cfg),
                              warmup=5, rep=30, return_mode="median")
            except Exception as e:  # out of shared memory etc.
                print(f"  {cfg}: failed ({type(e).__name__})")
                continue
            rows.append((f"kernel {cfg} normalize={normalize} exclude={with_excl}", ms))
        print(f"\nN={n} d={args.d} V={args.v} bf16, table {table_gb:.2f} GB")
        for name, ms in sorted(rows, key=lambda r: r[1]):
            gbs = table_gb / ms * 1e3
            print(f"  {ms:8.3f} ms  {gbs:7.0f} GB/s  {100 * gbs / bw:5.1f}% of copy  {name}")


if __name__ == "__main__":
    main()
