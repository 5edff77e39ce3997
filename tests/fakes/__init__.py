"""In-process and stand-alone fakes of the services bridge talks to."""
