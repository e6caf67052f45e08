import mkdocs_gen_files

with mkdocs_gen_files.open("benchmarks.md", "w") as f:
    f.write("# Benchmarks\n")
