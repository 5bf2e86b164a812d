package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// probeCode runs in a short-lived hidden node. The expression and target
// node come from the environment (not argv), so any expression text is safe.
// The expression is parsed locally and evaluated ON the target node with
// erl_eval (via rpc), where its value is also formatted with ~p, so pids,
// refs etc. print as the ejabberd node sees them.
const probeCode = `
Node = list_to_atom(os:getenv("MGPH_NODE")),
Timeout = list_to_integer(os:getenv("MGPH_TIMEOUT_MS")),
Src = os:getenv("MGPH_EXPR"),
Emit = fun(Code, Tag, Text) ->
    io:put_chars([<<"\n@@MGPH-RESULT@@ ">>, Tag, <<"\n">>, Text]),
    erlang:halt(Code)
end,
case erl_scan:string(Src) of
    {ok, Toks, _} ->
        case erl_parse:parse_exprs(Toks) of
            {ok, Exprs} ->
                case rpc:call(Node, erl_eval, exprs, [Exprs, []], Timeout) of
                    {value, V, _} -> Emit(0, <<"ok">>, V);
                    {badrpc, R} -> Emit(2, <<"badrpc">>, io_lib:format("~p", [R]));
                    Other -> Emit(3, <<"error">>, io_lib:format("~p", [Other]))
                end;
            {error, E} -> Emit(4, <<"parse">>, io_lib:format("~p", [E]))
        end;
    {error, E, _} -> Emit(4, <<"scan">>, io_lib:format("~p", [E]))
end.
`

// ErrBadRPC wraps errors returned by Eval when the remote call failed
// (exception in the expression, node down, timeout): {badrpc, Reason}.
var ErrBadRPC = errors.New("badrpc")

// Eval evaluates an Erlang expression (e.g. "erlang:system_info(process_count)",
// optionally several comma-separated expressions, no trailing '.') on the
// ejabberd node and returns its value printed with ~p. It uses a short-lived
// hidden node `erl -sname probe_<rand>@localhost -hidden -noinput` with
// HOME=Dir. A {badrpc, Reason} result is returned as an error wrapping
// ErrBadRPC. Without a ctx deadline the call is bounded to 30 s.
func (e *Ejabberd) Eval(ctx context.Context, expr string) (string, error) {
	ctx, cancel := withDefaultTimeout(ctx, 30*time.Second)
	defer cancel()

	expr = strings.TrimSpace(expr)
	expr = strings.TrimSpace(strings.TrimSuffix(expr, "."))
	if expr == "" {
		return "", errors.New("harness: Eval: empty expression")
	}
	// begin ... end keeps multi-expression input working; the newline
	// before "end" protects against a trailing % comment in expr.
	src := "io_lib:format(\"~p\", [begin\n" + expr + "\nend])."

	timeout := 30 * time.Second
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl) - 500*time.Millisecond
	}
	if timeout < 100*time.Millisecond {
		timeout = 100 * time.Millisecond
	}

	probe := "probe_" + randHex(5) + "@" + ErlNodeHost()
	env := baseEnv(e.runner.NodePath(e.Dir),
		"MGPH_NODE="+e.Node,
		"MGPH_EXPR="+src,
		"MGPH_TIMEOUT_MS="+strconv.FormatInt(timeout.Milliseconds(), 10),
	)
	args := append([]string{"-sname", probe, "-hidden", "-noinput"}, e.distArgs()...)
	args = append(args, "-eval", probeCode)
	cmd := e.runner.Command(e.erl, env, args...)
	cmd.Dir = e.Dir
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	runErr := runBounded(ctx, cmd)

	out := stdout.String()
	const marker = "\n@@MGPH-RESULT@@ "
	i := strings.LastIndex(out, marker)
	if i < 0 {
		if runErr == nil {
			runErr = errors.New("no result")
		}
		return "", fmt.Errorf("harness: Eval %q on %s: probe failed: %v\n%s", expr, e.Node, runErr,
			strings.TrimSpace(out+"\n"+stderr.String()))
	}
	tag, val, _ := strings.Cut(out[i+len(marker):], "\n")
	switch tag {
	case "ok":
		return val, nil
	case "badrpc":
		return "", fmt.Errorf("harness: Eval %q on %s: %w: %s", expr, e.Node, ErrBadRPC, val)
	default:
		return "", fmt.Errorf("harness: Eval %q on %s: %s error: %s", expr, e.Node, tag, val)
	}
}
