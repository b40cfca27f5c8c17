rule report:
    input:
        code("report"),
        metrics=run_files("results/{experiment}/metrics/{method}/seed{seed}.json"),
        samples=run_files("results/{experiment}/samples/{method}/seed{seed}/samples.npz"),
        probes=expand("results/{{experiment}}/probe/{method}/seed{seed}.json", method=config["methods"],
                      seed=config["seeds"]),
        histories=expand("results/{{experiment}}/history/{method}/seed{seed}.csv", method=config["methods"],
                         seed=config["seeds"]),
        manifest="results/{experiment}/data/manifest.json",
        evaluator_report="results/{experiment}/evaluator/report.json",
    output:
        csv=report(
            "results/{experiment}/report/summary.csv",
            category="{experiment}",
            subcategory="Summary",
            caption="../report/summary.rst",
        ),
        md="results/{experiment}/report/summary.md",
        paired=report(
            "results/{experiment}/report/paired.csv",
            category="{experiment}",
            subcategory="Summary",
            caption="../report/paired.rst",
        ),
        metrics="results/{experiment}/report/metrics.json",
        per_class=report(
            "results/{experiment}/report/per_class.csv",
            category="{experiment}",
            subcategory="Per class",
            caption="../report/per_class.rst",
        ),
        per_class_fid=report(
            "results/{experiment}/report/per_class_fid.png",
            category="{experiment}",
            subcategory="Per class",
            caption="../report/per_class_fid.rst",
        ),
        per_class_fid_csv="results/{experiment}/report/per_class_fid.csv",
        training_loss="results/{experiment}/report/training_loss.csv",
        training_curves=report(
            "results/{experiment}/report/training_curves.png",
            category="{experiment}",
            subcategory="Training curves",
            caption="../report/training_curves.rst",
        ),
        probe_csv=report(
            "results/{experiment}/report/probe.csv",
            category="{experiment}",
            subcategory="Capacity probes",
            caption="../report/probe_csv.rst",
        ),
        probe_png=report(
            "results/{experiment}/report/probe.png",
            category="{experiment}",
            subcategory="Capacity probes",
            caption="../report/probe.rst",
        ),
        grids=report(
            directory("results/{experiment}/report/grids"),
            patterns=["{method}.png"],
            category="{experiment}",
            subcategory="Samples",
            caption="../report/grids.rst",
        ),
    params:
        settings=settings("report"),
        # The selection, which --config may change (the stage would otherwise read params.yaml's).
        methods=evaluated_methods(config),
        seeds=config["seeds"],
        baseline=config["report"]["baseline"] or evaluated_methods(config)[0],
    log:
        "logs/{experiment}/report.log",
    threads: res("report", "threads")
    resources:
        mem_mb=res("report", "mem_mb"),
        runtime=res("report", "runtime"),
    conda:
        "../../envs/cm.yaml"
    shell:
        "python -m cm report --experiment {wildcards.experiment}"
        " --metrics-dir results/{wildcards.experiment}/metrics"
        " --samples-dir results/{wildcards.experiment}/samples --probe-dir results/{wildcards.experiment}/probe"
        " --history-dir results/{wildcards.experiment}/history"
        " --manifest {input.manifest}"
        " --evaluator-report {input.evaluator_report} --out-dir results/{wildcards.experiment}/report"
        " --methods {params.methods} --seeds {params.seeds} --baseline {params.baseline} > {log} 2>&1"


# Outputs made by Snakemake are recorded in dvc.lock and the DVC cache, so `dvc status` is clean
# and data and checkpoints are versioned whichever orchestrator produced them.
rule register_dvc:
    input:
        expand("results/{experiment}/report/summary.md", experiment=config["run"]),
    output:
        "results/dvc_commit.txt",
    params:
        experiments=config["run"],
    log:
        "logs/register_dvc.log",
    localrule: True
    conda:
        "../../envs/cm.yaml"
    shell:
        "python -m cm register-dvc --experiments {params.experiments} --out {output} > {log} 2>&1"
