package main

import (
	"context"
	"errors"
)

func runTsung(ctx context.Context, c config) error { return errors.New("todo") }
