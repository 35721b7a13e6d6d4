from batchclassify.cli import program

# Guarded: a worker process of --processes (multiprocessing's spawn) imports this module again.
if __name__ == "__main__":
    raise SystemExit(program())
