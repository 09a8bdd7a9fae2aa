"""Worker processes for the distributed-engine tests (importable by the processes torch.multiprocessing starts)."""
from __future__ import annotations

import os

import torch

from conftest import batches, group, tiny_blocks, tiny_revnet_blocks

STEPS = 5
PROBE_AT = 3  # the step that also measures σ
RANGES = {2: [(0, 3), (3, 5)], 3: [(0, 2), (2, 4), (4, 5)]}


def data():
    return batches(STEPS, seed=11), batches(2, seed=12), batches(1, seed=13)[0][0]


def tiny_gpt_blocks() -> list[torch.nn.Module]:
    """Five blocks of a small GPT (embedding, three transformer blocks, head) on byte tokens: as tiny_blocks."""
    from dbench.models.gpt import gpt

    torch.manual_seed(0)
    return gpt("tiny", layers=3, width=32, heads=4, context=TOKENS).blocks


TOKENS = 12  # context of the tiny GPT's sequences


def token_batches(n: int, seed: int, batch: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seq = torch.randint(0, 256, (batch, TOKENS + 1), generator=g)
        out.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return out


def text_data():
    return token_batches(STEPS, seed=11), token_batches(2, seed=12), token_batches(1, seed=13)[0][0]


# name: (blocks, (train batches, σ probe batches, test inputs), classes)
WORKLOADS = {"image": (tiny_blocks, data, 10), "text": (tiny_gpt_blocks, text_data, 256),
             # BatchNorm-free: a replica's shard then computes what the full batch computes for those samples
             "image-nobn": (lambda: tiny_blocks(batchnorm=False), data, 10),
             # reversible blocks, whose inputs PETRA rebuilds from their outputs
             "revnet": (tiny_revnet_blocks, data, 10)}


def equivalence_worker(rank: int, world: int, port: int, methods: list[str], path: str,
                       workload: str = "image") -> None:
    """Train every method for STEPS steps as module ``rank``; the top module saves what it saw."""
    import torch.distributed as dist

    from dbench.engine.distributed import RankTrainer, init
    from dbench.optim import OptimConfig

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init(rank, world, torch.device("cpu"), timeout_s=60)
    blocks, batches_of, classes = WORKLOADS[workload]
    train, probe, test_x = batches_of()
    results = {}
    for method in methods:
        module = group(blocks(), RANGES[world])[rank]
        t = RankTrainer(module, method, rank, world, torch.device("cpu"),
                        optim=OptimConfig(lr=0.05, momentum=0.9, weight_decay=0.0), options=None,
                        num_classes=classes, timeout_s=60)
        losses, sigma = [], None
        for i, (x, y) in enumerate(train):
            if i == PROBE_AT:
                t.probe_sigma(probe)
            out = t.step_output(x if rank == 0 else None, y)
            if i == PROBE_AT:
                sigma = t.take_sigma()
            if out is not None:
                losses.append(out.loss)
        logits = t.predict(test_x if rank == 0 else None)
        state = t.state_dict()
        if t.is_writer:
            results[method] = {"losses": losses, "state": state, "logits": logits,
                               "sigma": [(r.sigma, r.sigma_corrected, r.cosine) for r in sigma[0]]}
    if rank == world - 1:
        torch.save(results, path)
    dist.destroy_process_group()


def pipelining_worker(rank: int, world: int, port: int, schedule: str, microbatches: int, path: str) -> None:
    """torch.distributed.pipelining's own schedule on the BatchNorm-free tiny model: the reference for gpipe/1f1b.

    Its loss is the micro-batch mean and it divides the accumulated gradient by M (scale_grads), which is
    the batch mean for micro-batches of equal size.
    """
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    module = group(tiny_blocks(batchnorm=False), RANGES[world])[rank]
    stage = PipelineStage(module, rank, world, torch.device("cpu"))
    kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    runner = kind(stage, n_microbatches=microbatches, loss_fn=torch.nn.CrossEntropyLoss(), scale_grads=True)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    for x, y in data()[0]:
        optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            runner.step(x)
        elif rank == world - 1:
            runner.step(target=y)
        else:
            runner.step()
        optimizer.step()
    torch.save(module.state_dict(), f"{path}.{rank}")
    dist.destroy_process_group()


def hybrid_worker(rank: int, world: int, port: int, runs: list[tuple], path: str) -> None:
    """Process ``rank`` of K modules × D replicas (module rank % K of replica rank // K) for each of ``runs``
    ``(name, method, ranges, replicas, batch, workload, options)``; the writer saves what it saw."""
    import torch.distributed as dist

    from dbench.engine.distributed import RankTrainer, init
    from dbench.optim import OptimConfig

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init(rank, world, torch.device("cpu"), timeout_s=60)
    results = {}
    for name, method, ranges, replicas, batch, workload, options in runs:
        blocks, _, classes = WORKLOADS[workload]
        train, test_x = hybrid_data(workload, batch)
        k = len(ranges)
        t = RankTrainer(group(blocks(), ranges)[rank % k], method, rank, world, torch.device("cpu"),
                        optim=OptimConfig(lr=0.05, momentum=0.9, weight_decay=5e-4), options=options,
                        num_classes=classes, timeout_s=60, replicas=replicas)
        losses = []
        for x, y in train:
            out = t.step_output(x, y)
            if out is not None:
                losses.append(out.loss)
        logits = t.predict(test_x)
        state = t.state_dict()
        if t.is_writer:
            results[name] = {"losses": losses, "logits": logits, "state": state}
    if rank == world - 1:
        torch.save(results, path)
    dist.destroy_process_group()


def hybrid_data(workload: str, batch: int):
    """The training batches and the test inputs of the hybrid tests (every process reads the whole batch)."""
    if workload == "text":
        return token_batches(STEPS, seed=11, batch=batch), token_batches(1, seed=13, batch=batch)[0][0]
    return batches(STEPS, batch=batch, seed=11), batches(1, batch=batch, seed=13)[0][0]


PIECES = [(0, 1), (1, 2), (2, 3), (3, 5)]  # the five blocks cut into V·K = 4 modules (K = 2, V = 2)


def schedules_worker(rank: int, world: int, port: int, runs: list[tuple[str, str, int]], path: str,
                     replicas: int = 1, last: int = 12) -> None:
    """torch's multi-stage schedules through dbench (``RankTrainer``) as process ``rank`` of ``world`` (K = 2
    devices × ``replicas``): each run (method, workload, M) trains STEPS batches of 16 and one of ``last`` (a
    smaller last batch), then predicts; the top device saves the losses, the logits and every module's
    weights (replica 0's, gathered, in module order)."""
    import torch.distributed as dist

    from dbench.engine.distributed import RankTrainer, init
    from dbench.method import parse_options
    from dbench.optim import OptimConfig
    from dbench.registry import METHODS

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init(rank, world, torch.device("cpu"), timeout_s=60)
    results = {}
    for method, workload, microbatches in runs:
        blocks, batches_of, classes = WORKLOADS[workload]
        train, _, test_x = batches_of()
        last_x, last_y = train[0][0][:last], train[0][1][:last]
        cls = METHODS.get(method)
        options = parse_options(cls, {"microbatches": str(microbatches)})
        pieces = group(blocks(), PIECES)
        k = world // replicas
        held = cls.placement(rank % k, k, options)
        t = RankTrainer(torch.nn.ModuleList([pieces[j] for j in held]), method, rank, world, torch.device("cpu"),
                        optim=OptimConfig(lr=0.05, momentum=0.9, weight_decay=0.0), options=options,
                        num_classes=classes, timeout_s=60, replicas=replicas)
        losses = []
        for x, y in train + [(last_x, last_y)]:
            out = t.step_output(x if rank % k == 0 else None, y)
            if out is not None:
                losses.append(out.loss)
        logits = t.predict(test_x if rank % k == 0 else None)
        weights = t.gather({j: pieces[j].state_dict() for j in held} if rank < k else {})
        if t.is_writer:
            merged = {j: w for part in weights for j, w in part.items()}
            results[(method, workload)] = {"losses": losses, "logits": logits,
                                           "weights": [merged[j] for j in range(len(PIECES))]}
    if rank == world - 1:
        torch.save(results, path)
    dist.destroy_process_group()


def transport_sends(src: int, world: int, epoch: int) -> list[tuple[str, torch.Tensor, tuple]]:
    """What process ``src`` sends in ``epoch`` of the transport test, in order: (channel, tensor, tag). Sizes
    grow, shrink, repeat, reach zero; dtypes change; two channels of different shapes share each stream
    (up and the probe's up, down and the probe's down, the last process's errors and its gradients), so
    the slot both ends of a stream keep is right, too small and too large, on every stream."""
    from dbench.routes import DOWN, ERROR, PROBE_DOWN, PROBE_UP, UP

    g = torch.Generator().manual_seed(100 * epoch + src)
    shapes = [(4, 3), (4, 3), (4, 3), (2, 3), (6, 5, 2), (6, 5, 2), (0,), (), (4, 3), (1,), (3, 700), (3, 700)]
    dtypes = [torch.float32, torch.float32, torch.float64, torch.float32, torch.float16, torch.float16,
              torch.float32, torch.int64, torch.bool, torch.uint8, torch.bfloat16, torch.bfloat16]
    channels = ([UP, PROBE_UP] if src < world - 1 else []) + ([DOWN] if src > 0 else []) + \
        ([PROBE_DOWN] if 0 < src < world - 1 else []) + ([ERROR] if src == world - 1 else [])
    out = []
    for i in range(3 * len(shapes)):
        shape, dtype = shapes[i % len(shapes)], dtypes[(i // 2) % len(dtypes)]
        t = torch.randint(0, 2, shape, generator=g).bool() if dtype == torch.bool else \
            (torch.randn(shape, generator=g) * 50).to(dtype)
        out.append((channels[(i + i // 5) % len(channels)], t, (epoch, i)))
    return out


def transport_expected(rank: int, world: int, epoch: int) -> dict[str, list[tuple[torch.Tensor, tuple]]]:
    """What ``rank`` should read in ``epoch``, per channel in the order sent."""
    from dbench.routes import route

    expected: dict[str, list] = {}
    for src in range(world):
        for channel, tensor, tag in transport_sends(src, world, epoch):
            if rank in route(channel).targets(channel, src, world):
                expected.setdefault(channel, []).append((tensor, tag))
    return expected


def transport_worker(rank: int, world: int, port: int, path: str) -> None:
    """Each process sends its messages, then reads what it should get in an order other than the sending
    one (channel by channel, the last channel first, polling before waiting), over two epochs; it saves what
    it read."""
    from datetime import timedelta

    import torch.distributed as dist

    from dbench.engine.transport import Transport
    from dbench.method import Send

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    port_ = Transport(rank, world, torch.device("cpu"), streams=dist.new_group())
    got = []
    for epoch in range(2):
        for channel, tensor, tag in transport_sends(rank, world, epoch):
            port_.send(Send(channel, tensor.clone(), tag))
        expected = transport_expected(rank, world, epoch)
        for channel in sorted(expected, reverse=True):
            for _ in expected[channel]:
                message = port_.poll(channel) or port_.wait(channel)
                got.append((channel, message.tensor, message.tag))
        port_.flush()
        assert not any(port_.inbox.values()), "a message arrived that no one sent"
    torch.save(got, f"{path}.{rank}")
    dist.destroy_process_group()
