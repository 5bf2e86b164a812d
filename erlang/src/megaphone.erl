%% @doc The operator's interface to the shim, for the erl shell
%% (`ejabberdctl debug'):
%%
%%   1> code:add_patha("/opt/megaphone/erlang/ebin").
%%   2> megaphone:start().
%%   3> megaphone:status().
-module(megaphone).

-export([start/0, stop/0, status/0]).

%% @doc Starts the shim; sidecars can attach from then on.
-spec start() -> ok | {error, term()}.
start() ->
    case application:ensure_all_started(megaphone) of
        {ok, _} -> ok;
        {error, _} = Error -> Error
    end.

%% @doc Stops the shim. Every attached sidecar's session ends, and with it
%% every request in flight; the sidecars retry until the shim is back.
-spec stop() -> ok | {error, term()}.
stop() ->
    application:stop(megaphone).

%% @doc What is attached: one map per sidecar session, with its node,
%% protocol version, uptime and request counts.
-spec status() -> #{running := boolean(),
                    protocol_versions := [pos_integer()],
                    sidecars := [map()],
                    in_flight := non_neg_integer()}.
status() ->
    Running = whereis(megaphone_listener) =/= undefined,
    Sessions = case Running of
                   true -> megaphone_sidecar_sup:sessions();
                   false -> []
               end,
    %% Ask each session from the caller's process, never through the
    %% listener, so a status call can never stall a hello.
    Sidecars = [S || Pid <- Sessions, S <- [session_status(Pid)], is_map(S)],
    #{running => Running,
      protocol_versions => megaphone_listener:supported_versions(),
      sidecars => Sidecars,
      in_flight => lists:sum([maps:get(in_flight, S) || S <- Sidecars])}.

session_status(Pid) ->
    try megaphone_sidecar:status(Pid)
    catch exit:_ -> gone
    end.
