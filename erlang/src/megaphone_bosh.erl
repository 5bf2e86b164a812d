%% @doc One BOSH request, run end to end in a process of its own.
%%
%% ejabberd_bosh:process_request/3 blocks its caller for as long as the
%% client's long-poll waits (up to `wait' seconds), so each request gets its
%% own short-lived process: the session process that starts it never blocks.
%% The answer goes straight to the sidecar, not back through the session.
-module(megaphone_bosh).

-export([start/5, run/5, valid_peer/1, error_response/4]).

-define(BYTE(X), (is_integer(X) andalso X >= 0 andalso X =< 255)).
-define(PORT(X), (is_integer(X) andalso X >= 0 andalso X =< 65535)).

-type peer() :: {inet:ip_address(), inet:port_number()}.
-export_type([peer/0]).

%% @doc Starts a monitored worker for one request.
-spec start(pid(), non_neg_integer(), non_neg_integer(), peer(), binary()) -> {pid(), reference()}.
start(Sidecar, ConnId, ReqId, Peer, Body) ->
    spawn_monitor(?MODULE, run, [Sidecar, ConnId, ReqId, Peer, Body]).

%% @private The worker's body.
-spec run(pid(), non_neg_integer(), non_neg_integer(), peer(), binary()) -> ok.
run(Sidecar, ConnId, ReqId, Peer, Body) ->
    Reply = try ejabberd_bosh:process_request(Body, Peer, xml) of
                {Status, Reason, Headers, RespBody} when is_integer(Status) ->
                    {bosh_response, ConnId, ReqId, Status, to_binary(Reason),
                     [{to_binary(N), to_binary(V)} || {N, V} <- Headers],
                     iolist_to_binary(RespBody)}
            catch
                error:undef ->
                    error_response(ConnId, ReqId, 503, <<"ejabberd's BOSH is not running">>);
                Class:Error ->
                    logger:error("megaphone: ejabberd_bosh failed on request ~p/~p: ~p:~p",
                                 [ConnId, ReqId, Class, Error]),
                    error_response(ConnId, ReqId, 500, <<"Internal Server Error">>)
            end,
    %% noconnect: if the sidecar's node is gone, so is the client; the
    %% session process will kill us anyway.
    erlang:send(Sidecar, Reply, [noconnect]),
    ok.

%% @doc An HTTP error for a request that ejabberd could not answer.
-spec error_response(non_neg_integer(), non_neg_integer(), 100..999, binary()) -> tuple().
error_response(ConnId, ReqId, Status, Reason) ->
    {bosh_response, ConnId, ReqId, Status, Reason,
     [{<<"Content-Type">>, <<"text/plain; charset=utf-8">>}], Reason}.

%% @doc Whether a term is an {IP, Port} pair as ejabberd expects it.
-spec valid_peer(term()) -> boolean().
valid_peer({{A, B, C, D}, Port})
  when ?BYTE(A), ?BYTE(B), ?BYTE(C), ?BYTE(D), ?PORT(Port) ->
    true;
valid_peer({{_, _, _, _, _, _, _, _} = IP, Port}) when ?PORT(Port) ->
    lists:all(fun(W) -> is_integer(W) andalso W >= 0 andalso W =< 65535 end,
              tuple_to_list(IP));
valid_peer(_) ->
    false.

to_binary(B) when is_binary(B) -> B;
to_binary(L) when is_list(L) -> unicode:characters_to_binary(L);
to_binary(A) when is_atom(A) -> atom_to_binary(A, utf8);
to_binary(I) when is_integer(I) -> integer_to_binary(I).
