from scribe_events_cli.main import main

main()
