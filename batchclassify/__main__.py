from batchclassify.cli import main

raise SystemExit(main())
