from batchclassify.cli import main

# Guarded: a worker process of --processes (multiprocessing's spawn) imports this module again.
if __name__ == "__main__":
    raise SystemExit(main())
