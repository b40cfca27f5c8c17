rule prepare_data:
    input:
        code("prepare_data"),
    output:
        "results/{experiment}/data/manifest.json",
    params:
        settings=settings("prepare_data"),
    log:
        "logs/{experiment}/prepare_data.log",
    threads: res("prepare_data", "threads")
    resources:
        mem_mb=res("prepare_data", "mem_mb"),
        runtime=res("prepare_data", "runtime"),
    conda:
        "../../envs/cm.yaml"
    shell:
        "python -m cm prepare-data --experiment {wildcards.experiment} --out {output} > {log} 2>&1"
