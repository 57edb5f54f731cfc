from finevit.cli import main

raise SystemExit(main())
