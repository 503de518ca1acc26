from powerinfer.cli import main

raise SystemExit(main())
