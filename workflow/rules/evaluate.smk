rule train_evaluator:
    input:
        code("train_evaluator"),
    output:
        model="results/{experiment}/evaluator/feature_net.pt",
        report="results/{experiment}/evaluator/report.json",
    params:
        settings=settings("train_evaluator"),
    log:
        "logs/{experiment}/train_evaluator.log",
    threads: res("train_evaluator", "threads")
    resources:
        mem_mb=res("train_evaluator", "mem_mb"),
        runtime=res("train_evaluator", "runtime"),
    conda:
        "../../envs/cm.yaml"
    shell:
        "python -m cm train-evaluator --experiment {wildcards.experiment} --out {output.model}"
        " --report {output.report} > {log} 2>&1"


rule reference_features:
    input:
        code("reference_features"),
        evaluator="results/{experiment}/evaluator/feature_net.pt",
    output:
        features="results/{experiment}/reference/features.npz",
        stats="results/{experiment}/reference/stats.npz",
    params:
        settings=settings("reference_features"),
    log:
        "logs/{experiment}/reference_features.log",
    threads: res("reference_features", "threads")
    resources:
        mem_mb=res("reference_features", "mem_mb"),
        runtime=res("reference_features", "runtime"),
    conda:
        "../../envs/cm.yaml"
    shell:
        "python -m cm reference-features --experiment {wildcards.experiment}"
        " --evaluator {input.evaluator} --out {output.features} --stats-out {output.stats}"
        " > {log} 2>&1"


rule evaluate:
    input:
        code("evaluate"),
        samples="results/{experiment}/samples/{method}/seed{seed}/samples.npz",
        evaluator="results/{experiment}/evaluator/feature_net.pt",
        reference="results/{experiment}/reference/features.npz",
        stats="results/{experiment}/reference/stats.npz",
        manifest="results/{experiment}/data/manifest.json",
    output:
        metrics="results/{experiment}/metrics/{method}/seed{seed}.json",
        features="results/{experiment}/features/{method}/seed{seed}.npz",
    params:
        settings=settings("evaluate"),
    log:
        "logs/{experiment}/evaluate/{method}/seed{seed}.log",
    threads: res("evaluate", "threads")
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
    conda:
        "../../envs/cm.yaml"
    shell:
        "python -m cm evaluate --experiment {wildcards.experiment} --method {wildcards.method}"
        " --seed {wildcards.seed} --samples {input.samples} --evaluator {input.evaluator}"
        " --reference {input.reference} --stats {input.stats} --manifest {input.manifest}"
        " --out {output.metrics} --features-out {output.features}"
        " > {log} 2>&1"


rule probe:
    input:
        code("probe"),
        model="results/{experiment}/train/{method}/seed{seed}/model.pt",
        manifest="results/{experiment}/data/manifest.json",
    output:
        "results/{experiment}/probe/{method}/seed{seed}.json",
    params:
        settings=settings("probe"),
    log:
        "logs/{experiment}/probe/{method}/seed{seed}.log",
    threads: res("probe", "threads")
    resources:
        mem_mb=res("probe", "mem_mb"),
        runtime=res("probe", "runtime"),
    conda:
        "../../envs/cm.yaml"
    shell:
        "python -m cm probe --experiment {wildcards.experiment} --method {wildcards.method}"
        " --seed {wildcards.seed} --model {input.model} --manifest {input.manifest} --out {output}"
        " > {log} 2>&1"
