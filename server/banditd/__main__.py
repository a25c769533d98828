from banditd.cli import main

raise SystemExit(main())
