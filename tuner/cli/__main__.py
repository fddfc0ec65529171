"""`python -m tuner.cli ARGS`: what the Job and the tests run."""

from tuner.cli.commands import exit_with, main

exit_with(main())
