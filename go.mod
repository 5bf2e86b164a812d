module github.com/megaphone-im/megaphone

go 1.26.8

require (
	github.com/gorilla/websocket v1.5.3
	go.uber.org/goleak v1.3.0
	go.uber.org/zap v1.28.0
)

require go.uber.org/multierr v1.10.0 // indirect
