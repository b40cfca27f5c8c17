# A fine-tuning experiment's starting model (trained with DDPM on finetune.pretrain.data); for any
# other experiment a record that it trains from scratch, so training depends on this output alike.
rule pretrain:
    input:
        code("pretrain"),
    output:
        model="results/{experiment}/pretrain/model.pt",
        history="results/{experiment}/pretrain/history.csv",
    params:
        settings=settings("pretrain"),
        checkpoints=lambda wc: f"results/{wc.experiment}/pretrain/checkpoints",
    log:
        "logs/{experiment}/pretrain.log",
    threads: res("pretrain", "threads")
    resources:
        mem_mb=res("pretrain", "mem_mb"),
        runtime=res("pretrain", "runtime"),
        gpu=res("pretrain", "gpu"),
    conda:
        "../../envs/cm.yaml"
    shell:
        "python -m cm pretrain --experiment {wildcards.experiment} --out {output.model}"
        " --history {output.history} --checkpoints {params.checkpoints} > {log} 2>&1"


rule train:
    input:
        code("train"),
        manifest="results/{experiment}/data/manifest.json",
        pretrained="results/{experiment}/pretrain/model.pt",
    output:
        model="results/{experiment}/train/{method}/seed{seed}/model.pt",
        history=report(
            "results/{experiment}/history/{method}/seed{seed}.csv",
            category="{experiment}",
            subcategory="Training curves",
            caption="../report/history.rst",
        ),
    params:
        settings=settings("train"),
        # Not an output: Snakemake would delete it with a failed job, and resuming needs it.
        checkpoints=lambda wc: f"results/{wc.experiment}/train/{wc.method}/seed{wc.seed}/checkpoints",
    log:
        "logs/{experiment}/train/{method}/seed{seed}.log",
    threads: res("train", "threads") * train_processes(config)
    resources:
        mem_mb=res("train", "mem_mb"),
        runtime=res("train", "runtime"),
        gpu=res("train", "gpu"),
    conda:
        "../../envs/cm.yaml"
    shell:
        "python -m cm train --experiment {wildcards.experiment} --method {wildcards.method}"
        " --seed {wildcards.seed} --manifest {input.manifest} --out {output.model}"
        " --history {output.history} --checkpoints {params.checkpoints} --pretrained {input.pretrained} > {log} 2>&1"


rule merge:
    input:
        code("merge"),
        model=trained_model,
    output:
        "results/{experiment}/merged/{method}/seed{seed}/model.pt",
    params:
        settings=settings("merge"),
    log:
        "logs/{experiment}/merge/{method}/seed{seed}.log",
    threads: res("merge", "threads")
    resources:
        mem_mb=res("merge", "mem_mb"),
        runtime=res("merge", "runtime"),
    conda:
        "../../envs/cm.yaml"
    shell:
        "python -m cm merge --experiment {wildcards.experiment} --method {wildcards.method}"
        " --seed {wildcards.seed} --model {input.model} --out {output} > {log} 2>&1"


rule sample:
    input:
        code("sample"),
        model="results/{experiment}/merged/{method}/seed{seed}/model.pt",
    output:
        "results/{experiment}/samples/{method}/seed{seed}/samples.npz",
    params:
        settings=settings("sample"),
    log:
        "logs/{experiment}/sample/{method}/seed{seed}.log",
    threads: res("sample", "threads")
    resources:
        mem_mb=res("sample", "mem_mb"),
        runtime=res("sample", "runtime"),
        gpu=res("sample", "gpu"),
    conda:
        "../../envs/cm.yaml"
    shell:
        "python -m cm sample --experiment {wildcards.experiment} --method {wildcards.method}"
        " --seed {wildcards.seed} --model {input.model} --out {output} > {log} 2>&1"
