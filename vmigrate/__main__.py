from vmigrate.cli.main import main

raise SystemExit(main())
