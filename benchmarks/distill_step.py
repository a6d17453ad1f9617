"""Where a distillation step's time goes on this machine: data, student forward, backward + SGD step, and the
teacher (cached targets: a lookup; with `--hint-weight`: a forward per step), for each student, side by side.

    python benchmarks/distill_step.py --data SPLIT/train [--models mobileone_112_s0 mobileone_112_dbb_s0] [-b 64]
        [--amp] [--teacher-checkpoint ../shared/data/mobilefacenet_y1/model-0000.params]

Each timed part runs once per round for every model, round-robin over the models (`profile.time_round_robin`,
with its pause), `--rounds` rounds, median per part. Data: decoding and flipping one batch of the folder's JPEGs in
the main process (train.face decodes in `-j` workers beside the step: with 2 cores, they share them). Prints one
JSON object: per model, the seconds of each part and images/s of the whole step (data excluded: it overlaps).
"""
import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    import timm
    import timm_mobileone  # noqa: F401
    from timm_mobileone.deploy.profile import time_round_robin
    from train.data import collate, open_dataset
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data', required=True, help='an ImageFolder of aligned crops (e.g. train.split\'s train/)')
    p.add_argument('--models', nargs='+', default=['mobileone_112_s0', 'mobileone_112_dbb_s0'])
    p.add_argument('-b', '--batch-size', type=int, default=64)
    p.add_argument('--amp', action='store_true', help='bfloat16 autocast (train.face --amp on CPU)')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--teacher-checkpoint', default='', help='MobileFaceNet weights: also time its forward (the hint)')
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dataset = open_dataset(args.data, (112, 112))
    batch_ids = list(range(args.batch_size))

    def data():
        return collate([dataset[i] for i in batch_ids])

    images = (data()[0].float() / 255 - 0.5) / 0.5
    targets = F.normalize(torch.randn(args.batch_size, 128), dim=1)
    def amp():
        return torch.autocast('cpu', dtype=torch.bfloat16) if args.amp else nullcontext()

    calls = {'data': data}
    for name in args.models:
        model = timm.create_model(name, num_classes=0, embed_dim=128).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def forward(model=model):
            with torch.no_grad(), amp():
                return model(images)

        def step(model=model, opt=opt):
            with amp():
                out = model(images)
            loss = (1 - F.cosine_similarity(out.float(), targets)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

        calls[f'{name}/forward'] = forward
        calls[f'{name}/step'] = step
    if args.teacher_checkpoint:
        from timm_mobileone.checkpoints import create_model_checked
        teacher = timm.utils.reparameterize_model(create_model_checked('mobilefacenet',
                                                                       checkpoint=args.teacher_checkpoint).eval())

        def teacher_forward():
            with torch.no_grad(), amp():
                teacher.forward_features(images)
        calls['teacher/forward_features'] = teacher_forward
    times = time_round_robin(calls, repeats=args.rounds)
    result = dict(batch_size=args.batch_size, amp=args.amp, threads=torch.get_num_threads(),
                  data_s=round(times['data'], 3),
                  teacher_hint_forward_s=round(times['teacher/forward_features'], 3) if args.teacher_checkpoint else None,
                  models={n: dict(forward_s=round(times[f'{n}/forward'], 3), step_s=round(times[f'{n}/step'], 3),
                                  images_per_second=round(args.batch_size / times[f'{n}/step'], 2))
                          for n in args.models},
                  command='python benchmarks/distill_step.py ' + ' '.join(sys.argv[1:] if argv is None else argv))
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
